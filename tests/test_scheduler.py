"""BatchScheduler lifecycle on a tiny artifact: closing fails unfinished requests with a typed error,
requests compare by identity."""

from __future__ import annotations

import asyncio
import threading

import pytest
from tta_engine.errors import ModelUnloadedError, OverloadedError
from tta_engine.sampling import SamplingParams
from tta_engine.scheduler import END, BatchScheduler, Request


@pytest.fixture()
def lm(artifacts, tiny_configs):
    from tta_engine.runtime import open_artifact_lm

    model = open_artifact_lm(artifacts.get("tiny-llama", "fp32"), tiny_configs["tiny-llama"])
    yield model
    model.close()


def test_close_fails_queued_and_active_requests_with_a_typed_error(lm):
    """One request decoding (held after its first token), one queued behind it (max_batch=1): close()
    ends both with ModelUnloadedError, never END (which would pass off empty / truncated text as done)."""
    sched = BatchScheduler(lm, max_batch=1)
    params = SamplingParams(max_new_tokens=200, min_new_tokens=200, temperature=0.0)
    got: dict[int, list] = {0: [], 1: []}
    first_token, release = threading.Event(), threading.Event()
    take = sched._take

    def held_take(req, logits):  # hold the loop thread after the first token until close() was called
        take(req, logits)
        if not first_token.is_set():
            first_token.set()
            release.wait(10)

    sched._take = held_take

    def emit(i):
        return got[i].append

    reqs = [sched.submit(list(range(5, 25)), params, emit(i)) for i in range(2)]
    assert first_token.wait(10)
    closer = threading.Thread(target=sched.close)
    closer.start()
    while not sched.closed:
        pass
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    for i in range(2):
        assert got[i] and isinstance(got[i][-1], ModelUnloadedError), got[i][-1:]
        assert END not in got[i]
        assert isinstance(got[i][-1], OverloadedError)  # same family as "being unloaded" at submit
    assert len(reqs[0].state.tokens) < 200 and not reqs[1].state.tokens
    with pytest.raises(ModelUnloadedError):
        sched.submit([1, 2, 3], params, lambda item: None)


def test_unloading_a_model_mid_stream_raises_and_is_not_counted_as_completed(artifacts, tiny_configs):
    from tta_engine.manager import TransformersModelManager

    artifacts.get("tiny-llama", "fp32")
    m = TransformersModelManager(tiny_configs, artifacts_root=artifacts.root / "auto")

    async def main():
        stream = m.astream("Once upon a time", "tiny-llama", max_tokens=200, min_new_tokens=200, temperature=0)
        await stream.__anext__()
        await asyncio.to_thread(m.unload_model, "tiny-llama")
        async for _ in stream:
            pass

    try:
        with pytest.raises(ModelUnloadedError):
            asyncio.run(main())
        st = m.stats()["tiny-llama"]
        assert st["completed"] == 0 and st["failed"] == 1 and st["requests"] == 1
    finally:
        m.close()


def test_requests_compare_by_identity():
    params = SamplingParams(max_new_tokens=4)
    a, b = (Request([1, 2, 3], params, print, None) for _ in range(2))
    assert a != b and a == a and len({a, b}) == 2
    assert b not in [a]


def test_requests_cancelled_while_queued_free_their_queue_slots(lm):
    """The loop is held on a decoding request; two queued requests (max_queue=2) are cancelled by their
    clients. A new submit must be accepted (their slots are free), not refused with OverloadedError, and
    the cancelled ones end as cancelled with END."""
    sched = BatchScheduler(lm, max_batch=1, max_queue=2)
    params = SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.0)
    first_token, release = threading.Event(), threading.Event()
    take = sched._take

    def held_take(req, logits):
        take(req, logits)
        if not first_token.is_set():
            first_token.set()
            release.wait(10)

    sched._take = held_take
    got: dict[int, list] = {i: [] for i in range(4)}
    try:
        sched.submit(list(range(5, 25)), params, got[0].append)
        assert first_token.wait(10)
        queued = [sched.submit(list(range(5, 15)), params, got[i].append) for i in (1, 2)]
        with pytest.raises(OverloadedError):
            sched.submit(list(range(5, 15)), params, lambda item: None)
        for req in queued:
            req.cancel()
        late = sched.submit(list(range(5, 15)), params, got[3].append)
        for req in queued:
            assert req.state.finish_reason == "cancelled" and not req.state.tokens
        assert got[1] == [END] and got[2] == [END]
    finally:
        release.set()
    deadline = threading.Event()
    for _ in range(200):
        if got[3] and got[3][-1] is END:
            break
        deadline.wait(0.05)
    assert got[3][-1] is END and len(late.state.tokens) == 40
    sched.close()
