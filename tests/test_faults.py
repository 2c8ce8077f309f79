"""Faults and bad input (issue 9): embeddings beyond the cache size, the eviction race, typed errors for
every kind of bad input, and the manager keeps serving afterwards."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from tta_engine.errors import EmptyInputError, InvalidInputError, ModelTypeError, TTAEngineError
from tta_engine.manager import TransformersModelManager

MSGS = [{"role": "user", "content": "The lantern flickers in the forest."}]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture()
def roots(artifacts):
    for name in ("tiny-llama", "tiny-qwen2"):
        artifacts.get(name, "fp32")
    artifacts.get("tiny-bert", "fp32")
    return artifacts.root / "auto"


def make(tiny_configs, roots, **kw) -> TransformersModelManager:
    return TransformersModelManager(tiny_configs, artifacts_root=roots, **kw)


# -- defect 2: embeddings beyond the cache size, cache shared between threads ------------------------------

@pytest.mark.parametrize("cache_size", [0, 2])
def test_embeddings_beyond_the_cache_size(tiny_configs, roots, cache_size):
    texts = ["a calm lake", "a stormy sea", "a quiet pond", "a calm lake", "an old mill"]
    m = make(tiny_configs, roots, embedding_cache_size=cache_size)
    try:
        got = m.get_embeddings(texts, "tiny-bert")
        ref = m._loaded["tiny-bert"].model.encode(texts)
        assert all(v is not None for v in got)
        np.testing.assert_allclose(np.array(got), ref, rtol=1e-5, atol=1e-6)
        again = m.embed(texts[::-1], "tiny-bert")  # partly cached, partly evicted
        np.testing.assert_allclose(again, ref[::-1], rtol=1e-5, atol=1e-6)
        assert len(m._emb_cache.data) <= cache_size
    finally:
        m.close()


def test_embedding_cache_shared_by_threads(tiny_configs, roots):
    texts = [f"text number {i}" for i in range(40)]
    m = make(tiny_configs, roots, embedding_cache_size=7)
    try:
        ref = m._ensure_loaded("tiny-bert").model.encode(texts)
        errors, results = [], {}

        def worker(k: int) -> None:
            try:
                for j in range(15):
                    idx = [(k * 7 + j * 3 + i) % len(texts) for i in range(9)]
                    results[(k, j)] = (idx, m.embed([texts[i] for i in idx], "tiny-bert"))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for idx, vecs in results.values():
            np.testing.assert_allclose(vecs, ref[idx], rtol=1e-5, atol=1e-6)
        assert m.stats()["tiny-bert"]["in_flight"] == 0
    finally:
        m.close()


# -- defect 3: a load must not evict a model between lookup and use --------------------------------------

def test_generation_is_not_evicted_between_lookup_and_submit(tiny_configs, roots):
    m = make(tiny_configs, roots, max_loaded_models=1)
    try:
        ref = run(m.generate(MSGS, "tiny-llama", max_tokens=6, temperature=0))
        lm = m._loaded["tiny-llama"].model
        real = lm.encode_prompt

        def encode_while_another_model_loads(prompt, tools=None):
            m.load_model("tiny-qwen2")  # max_loaded_models=1: evicts every idle model
            return real(prompt, tools)

        lm.encode_prompt = encode_while_another_model_loads
        assert run(m.generate(MSGS, "tiny-llama", max_tokens=6, temperature=0)) == ref
        del lm.encode_prompt
        assert m.stats()["tiny-llama"]["in_flight"] == 0
        m.unload_model("tiny-qwen2")
        m.load_model("tiny-qwen2")  # tiny-llama is idle now: evictable again
        assert m.loaded_models == ["tiny-qwen2"]
    finally:
        m.close()


def test_embedding_is_not_evicted_between_lookup_and_encode(tiny_configs, roots):
    m = make(tiny_configs, roots, max_loaded_models=1)
    try:
        ref = m.embed(["first"], "tiny-bert")
        cache = m._emb_cache
        real_get = cache.get
        loads = []

        def get_while_another_model_loads(key):
            if not loads:
                loads.append(m.load_model("tiny-llama"))
            return real_get(key)

        cache.get = get_while_another_model_loads
        out = m.embed(["first", "second"], "tiny-bert")
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)
        assert m.stats()["tiny-bert"]["in_flight"] == 0
    finally:
        m.close()


def test_failed_and_cancelled_requests_release_the_model(tiny_configs, roots):
    m = make(tiny_configs, roots)
    try:
        with pytest.raises(InvalidInputError):
            run(m.generate([{"role": "user"}], "tiny-llama"))
        with pytest.raises(TTAEngineError):
            run(m.generate(MSGS, "tiny-llama", temperature=float("nan")))

        async def cancel_midway():
            first = asyncio.Event()  # cancel once decoding has begun (a timed sleep lets a quiet machine finish)
            task = asyncio.create_task(m.generate_streaming(MSGS, "tiny-llama", lambda d: first.set(),
                                                            max_tokens=200, min_new_tokens=200))
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(cancel_midway())
        assert m.stats()["tiny-llama"]["in_flight"] == 0
    finally:
        m.close()


# -- defect 5: every kind of bad input gets a typed error, and the manager keeps serving ------------------

class Msg:
    def __init__(self, role, content):
        self.role, self.content = role, content


BAD_PROMPTS = [None, 123, 4.5, b"\xff\xfe", bytearray(b"hi"), ["hi", "there"], {"role": "user", "content": "hi"},
               [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": None}],
               [{"role": "user", "content": 5}], [{"role": "wizard", "content": "hi"}], [{"role": 3, "content": "x"}],
               "\ud800", [{"role": "user", "content": "a\udfffb"}], [Msg("user", None)], [object()], [None],
               "", "   \n\t", [], [{"role": "user", "content": "  "}]]
BAD_TEXTS = [[1, None], ["ok", 3], [None], [b"x"], None, ["\ud800"], [], 7, {"a": "b"}, b"bytes"]


@pytest.mark.parametrize("prompt", BAD_PROMPTS, ids=repr)
def test_bad_prompts_raise_typed_errors(prompt, shared_manager):
    with pytest.raises(InvalidInputError):
        run(shared_manager.generate(prompt, "tiny-llama", max_tokens=4))
    assert run(shared_manager.generate(MSGS, "tiny-llama", max_tokens=4, temperature=0))  # keeps serving


@pytest.mark.parametrize("texts", BAD_TEXTS, ids=repr)
def test_bad_embedding_inputs_raise_typed_errors(texts, shared_manager):
    with pytest.raises(InvalidInputError):
        shared_manager.get_embeddings(texts, "tiny-bert")
    assert len(shared_manager.get_embeddings(["still fine"], "tiny-bert")[0]) == 64


def test_message_objects_and_dicts_are_the_same_prompt(shared_manager):
    a = run(shared_manager.generate([Msg("user", MSGS[0]["content"])], "tiny-llama", max_tokens=6, temperature=0))
    assert a == run(shared_manager.generate(MSGS, "tiny-llama", max_tokens=6, temperature=0))


def test_wrong_model_kind_fails_before_loading(tiny_configs, roots):
    m = make(tiny_configs, roots)
    try:
        with pytest.raises(ModelTypeError, match="embedding model"):
            run(m.generate(MSGS, "tiny-bert"))
        with pytest.raises(ModelTypeError, match="causal_lm model"):
            m.embed(["x"], "tiny-llama")
        assert m.loaded_models == []  # nothing was loaded to find out
    finally:
        m.close()


def test_empty_errors_are_invalid_input_errors():
    assert issubclass(EmptyInputError, InvalidInputError) and issubclass(InvalidInputError, ValueError)
