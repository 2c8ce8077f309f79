"""The determinism contract (README "Determinism"): with default settings a request's output -- greedy, or
sampled with a seed -- does not depend on the cache state, on the requests batched with it, or on how
many times it was sent. On a tiny int4 artifact, whose prompts run on an int8 prefill graph and whose
decode steps run on the int4 graph (the layout of the default model), so that any difference in how a
position is computed shows up in the tokens."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from tta_engine.manager import TransformersModelManager

MODEL = "tiny-llama"
WORLD = {"role": "system", "content": "World state: " + "the forest, the river, the old mill, a lantern. " * 5}
ASK = {"role": "user", "content": "I walk to the mill."}
GREEDY = dict(max_tokens=20, min_new_tokens=20, temperature=0)
SEEDED = dict(max_tokens=20, min_new_tokens=20, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def root(artifacts):
    artifacts.get(MODEL, "int4")
    return artifacts.root / "auto"


@pytest.fixture(scope="module")
def configs(tiny_configs):
    return {MODEL: dataclasses.replace(tiny_configs[MODEL], precision="int4")}


def fresh(root, configs, prompt, **kw) -> list[int]:
    """The reference: the request alone on a manager that has served nothing."""
    m = TransformersModelManager(configs, artifacts_root=root)
    try:
        return asyncio.run(m.complete(prompt, MODEL, **kw))["token_ids"]
    finally:
        m.close()


def test_same_request_twenty_times_among_others_gives_one_answer(root, configs):
    prompt = [WORLD, ASK]
    refs = {"greedy": fresh(root, configs, prompt, **GREEDY), "seeded": fresh(root, configs, prompt, **SEEDED)}
    m = TransformersModelManager(configs, artifacts_root=root)

    async def main():
        got = {"greedy": [], "seeded": []}
        for wave in range(5):  # 4 copies per wave, next to other requests sharing the world prefix
            others = [[WORLD, {"role": "user", "content": f"I look at thing {wave}-{i}."}] for i in range(3)]
            jobs = [m.complete(prompt, MODEL, **(GREEDY if i % 2 else SEEDED)) for i in range(4)]
            jobs += [m.complete(o, MODEL, max_tokens=8 + 7 * i, temperature=0.8, seed=i) for i, o in enumerate(others)]
            res = await asyncio.gather(*jobs)
            for i in range(4):
                got["greedy" if i % 2 else "seeded"].append(tuple(res[i]["token_ids"]))
        return got

    try:
        got = asyncio.run(main())
        assert m.stats()[MODEL]["reused_prompt_tokens"] > 0  # the cache was used along the way
    finally:
        m.close()
    for kind in ("greedy", "seeded"):
        assert len(got[kind]) == 10 and set(got[kind]) == {tuple(refs[kind])}, kind


@pytest.mark.parametrize("think_time", [False, True], ids=["at-once", "after-think-time"])
def test_second_turn_reusing_the_first_equals_a_fresh_manager(root, configs, think_time):
    """Turn 2 repeats turn 1 (prompt and reply) and adds a message. Sent right away, or after the
    scheduler has recomputed the resident reply (player think-time), it equals a fresh manager's turn 2."""
    m = TransformersModelManager(configs, artifacts_root=root)
    try:
        first = asyncio.run(m.complete([WORLD, ASK], MODEL, **SEEDED))
        turn2 = [WORLD, ASK, {"role": "assistant", "content": first["text"]},
                 {"role": "user", "content": "I open the door."}]
        sched = m._loaded[MODEL].scheduler
        if think_time:
            assert _wait(sched.settled)
        before = m.stats()[MODEL]["reused_prompt_tokens"]
        second = asyncio.run(m.complete(turn2, MODEL, **SEEDED))
        reused = m.stats()[MODEL]["reused_prompt_tokens"] - before
        lm = m._loaded[MODEL].model
        resident, wanted = lm.encode_prompt([WORLD, ASK]) + list(first["token_ids"]), lm.encode_prompt(turn2)
    finally:
        m.close()
    prompt1 = first["usage"]["prompt_tokens"]
    assert reused >= prompt1 - 2  # turn 1's prompt, at least
    # how far turn 2's ids equal turn 1's prompt + reply (the reply's text may re-tokenize otherwise)
    common = next((i for i, (a, b) in enumerate(zip(resident, wanted, strict=False)) if a != b), min(len(resident), len(wanted)))
    if think_time and common > prompt1 + 1:  # the reply was recomputed on the prefill graph: reused too
        assert reused > prompt1, (reused, prompt1, common)
    assert second["token_ids"] == fresh(root, configs, turn2, **SEEDED)


def _wait(cond, timeout: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.01)
    return cond()
