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


def serve_subprocess(root, models: list[str], timeout: float = 180.0):
    """``tta-engine serve`` on a free loopback port over ``root``'s artifacts (onnx backend), waited for
    until /health lists every model: (process, base URL). The caller stops it (SIGTERM) and checks its exit."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tta_engine.cli", "serve", "--artifacts", str(root), "--port",
                             str(port), "--models", *models, "--backend", "onnx"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline, up = time.monotonic() + timeout, False
    while not up and time.monotonic() < deadline and proc.poll() is None:
        try:
            up = set(models) <= set(httpx.get(url + "/health", timeout=2).json().get("loaded_models", []))
        except httpx.HTTPError:
            time.sleep(0.3)
    if not up:
        reason = proc.stderr.read() if proc.poll() is not None else "server not ready"
        proc.kill()
        raise AssertionError(reason)
    return proc, url
