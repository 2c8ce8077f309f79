"""Memory and cold start: peak RSS and load time of each engine in a fresh subprocess (the probe run by
``python -m bench --probe``), or the in-process RSS growth while loading (quick mode)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engines import make_emb_engine, make_lm_engine
from .prompts import embedding_corpus
from .specs import load_engines


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int | None:
    """Peak RSS of this process. On Linux /proc/self/status VmHWM (per address space, so a subprocess
    does not inherit its parent's peak, unlike ru_maxrss across fork/exec); elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except ImportError:
        return None


PROBE_IMPORTS = ("numpy", "onnxruntime", "torch", "transformers")


def run_probe(spec: dict[str, Any], kind: str) -> dict[str, Any]:
    """Run inside a fresh process: import the common libraries, load (timed), run a little, report RSS."""
    import importlib

    for mod in PROBE_IMPORTS:  # the same baseline for every engine (all of them use a HF tokenizer)
        importlib.import_module(mod)
    base = _rss()
    t0 = time.perf_counter()
    eng = make_lm_engine(spec) if kind == "lm" else make_emb_engine(spec)
    eng.load()
    load_s = time.perf_counter() - t0
    loaded = _rss()
    if kind == "lm":
        eng.run(list(range(10, 42)), 16)
    else:
        eng.encode(embedding_corpus(32), 32)
    peak = _peak_rss() or _rss()
    return {"load_s": load_s, "rss_after_imports_mb": base / 2**20, "rss_after_load_mb": loaded / 2**20,
            "peak_rss_mb": peak / 2**20, "model_rss_mb": (peak - base) / 2**20, "rss_method": "subprocess"}


def probe_in_subprocess(spec: dict[str, Any], kind: str, timeout: float = 600) -> dict[str, Any]:
    import os
    import subprocess
    from pathlib import Path

    benchmarks_dir = str(Path(__file__).resolve().parents[1])  # the checkout's benchmarks/ (holds bench/)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [benchmarks_dir, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench", "--probe", kind, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"probe failed (rc {proc.returncode}): {tail[0]}"}
    return json.loads(lines[-1])


def memory_figures(engines: Sequence, kind: str, method: str, log: Callable[[str], None] = print
                   ) -> dict[str, dict[str, Any]]:
    """Cold-start load time and RSS per engine (``method``: subprocess | delta | off)."""
    out = {}
    for e in engines:
        rec = {"size_bytes": e.size_bytes, "load_s": getattr(e, "load_s", None),
               "rss_delta_mb": getattr(e, "rss_delta_mb", None)}
        if method == "subprocess":
            probe = probe_in_subprocess(e.spec, kind)
            rec.update(probe)
            if "error" not in probe:
                rec["load_s"] = probe["load_s"]
                log(f"  {e.key:18} cold start {probe['load_s']:.2f}s  peak RSS {probe['peak_rss_mb']:.0f} MB "
                    f"(model +{probe['model_rss_mb']:.0f} MB)")
            else:
                log(f"  {e.key}: {probe['error']}")
        else:
            rec["rss_method"] = "delta" if method == "delta" else None
        out[e.key] = rec
    return out


def load_with_rss(specs, make, model, skipped, log, delta: bool):
    """load_engines, recording each engine's in-process RSS growth when ``delta`` (quick mode)."""
    engines = []
    for spec in specs:
        before = _rss() if delta else 0
        got = load_engines([spec], make, model, skipped, log)
        for e in got:
            if delta:
                import gc

                gc.collect()
                e.rss_delta_mb = (_rss() - before) / 2**20
        engines.extend(got)
    return engines


