"""Unloading must hand memory back (engine/host_heap.py): with glibc's per-thread arenas, freed model memory
stayed behind fragmentation. Measured on the defaults before the fix: RSS after each of 12 load/unload
cycles wandered between 85 and 185 MB; with at most 2 arenas, 85-87 MB."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or "libc.so" not in str(ctypes.util.find_library("c")),
                                reason="glibc only")

CYCLES = r"""
import asyncio, json, sys
from tta_engine.config import load_model_configs
from tta_engine.manager import TransformersModelManager
def rss():
    with open("/proc/self/status") as f:
        return [int(l.split()[1]) for l in f if l.startswith("VmRSS")][0] / 1024
m = TransformersModelManager(load_model_configs(), artifacts_root=sys.argv[1])
LM, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
after = []
for _ in range(12):
    asyncio.run(m.generate([{"role": "user", "content": "A short reply."}], LM, max_tokens=8, temperature=0))
    m.get_embeddings(["calm", "anxious"], EMB)
    m.unload_model(LM)
    m.unload_model(EMB)
    after.append(rss())
print(json.dumps(after))
"""


@pytest.mark.e2e
def test_load_unload_cycles_of_the_defaults_return_their_memory(default_artifacts):
    root, _, _ = default_artifacts
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "TTA_ENGINE_LIMIT"))}
    out = subprocess.run([sys.executable, "-c", CYCLES, str(root)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = json.loads(out.stdout.strip().splitlines()[-1])
    # The issue's bound: within 50 MB of the first plateau, i.e. after the first cycles' one-off growth
    # (first-use caches: fresh-clone CI runs went 97 MB, then 117-124 MB). Measured over cycles 3-12: with
    # the arena limit 85-87 MB here and at most +34 MB in CI; without it 85-185 MB.
    plateau = after[2:]
    assert max(plateau) - min(plateau) < 50, after


def test_pin_is_skipped_when_the_user_tunes_malloc(monkeypatch):
    from tta_engine import host_heap

    monkeypatch.setattr(host_heap, "_limited", False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert host_heap.limit_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("TTA_ENGINE_LIMIT_ARENAS", "0")
    assert host_heap.limit_arenas() is False
    monkeypatch.delenv("TTA_ENGINE_LIMIT_ARENAS")
    assert host_heap.limit_arenas() is True
