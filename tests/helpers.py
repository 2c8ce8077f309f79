"""Small helpers shared by several test modules (import with ``from helpers import ...``)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def wait_until(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes (the scheduler retires a cancelled row at its
    next step, on its own thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def load_example(name: str):
    """Import ``examples/<name>.py`` as module ``name`` (registered in sys.modules: pydantic resolves the
    annotations of its models there)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def two_turns(sched, lm, prompts) -> list[list[int]]:
    """Drive a BatchScheduler as a game does: every prompt at once (greedy, 12 + 3i tokens), then every
    prompt again followed by 4 tokens of its own reply (a second turn that reuses the first's KV).
    Returns the token ids of the 2 x len(prompts) replies."""
    from tta_engine.generator import GenerationState
    from tta_engine.scheduler import stream_request

    async def one(ids, n):
        st = GenerationState(len(ids))
        async for _ in stream_request(sched, ids, lm.params(temperature=0, max_new_tokens=n, min_new_tokens=n), st):
            pass
        return st.tokens

    async def main():
        first = await asyncio.gather(*(one(p, 12 + 3 * i) for i, p in enumerate(prompts)))
        again = await asyncio.gather(*(one(p + t[:4], 10) for p, t in zip(prompts, first, strict=True)))
        return first + again

    return asyncio.run(main())
