"""Where a cold start goes: new process -> first token of an artifact, phase by phase, with RSS.

Each variant runs in fresh processes (files in the OS page cache: a warm-disk cold start), alternating
variants, median of ``--reps``. ``--runtime-python`` adds the same run in a runtime-only venv (no torch). Phases: ``import`` (tta_engine.runtime, onnxruntime, numpy), ``manifest``
(read + the sha256 of every file when ``verify``), ``sessions`` (the decode graph and, for int4, the
int8 prefill graph), ``tokenizer``, ``first_token`` (chat prompt -> first token: prefill + sampling).

    .venv/bin/python benchmarks/cold_start.py --artifacts DIR [--model smollm2-135m-instruct] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
def rss():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) // 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}
import numpy, onnxruntime
from tta_engine.artifact import load_artifact
from tta_engine.ort_decoder import OrtDecoder
from tta_engine.runtime import LanguageModel, SamplingParams
from tta_engine.tokenizer import Tokenizer
from tta_engine.generator import GenerationState, generate_events
out = {"import": time.perf_counter() - t0}
base = rss()["VmRSS"]
path, verify, variant = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
if variant:  # session options under test: wrap the runtime's own session factory
    import tta_engine.ort_decoder as od
    import tta_engine.ort_session as osess
    def create_session(p, **kw):
        import onnxruntime as ort
        real = ort.InferenceSession
        def patched(model, sess_options=None, providers=None):
            for k, v in variant.get("config", {}).items():
                sess_options.add_session_config_entry(k, v)
            if "arena" in variant:
                sess_options.enable_cpu_mem_arena = variant["arena"]
            if "opt_level" in variant:
                sess_options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, variant["opt_level"])
            return real(model, sess_options=sess_options, providers=providers)
        ort.InferenceSession = patched
        try:
            return osess.create_session(p, **kw)
        finally:
            ort.InferenceSession = real
    od.create_session = create_session
t = time.perf_counter(); art = load_artifact(path, verify=verify); out["manifest"] = time.perf_counter() - t
t = time.perf_counter()
meta = dict(art.manifest["decoder"])
if variant.get("no_prefill_graph"):
    meta.pop("prefill", None)
dec = OrtDecoder(art.file("model.onnx"), meta)
out["sessions"] = time.perf_counter() - t
loaded = rss()["VmRSS"]
t = time.perf_counter(); tok = Tokenizer.from_artifact(art.path, art.manifest["tokenizer"])
out["tokenizer"] = time.perf_counter() - t
lm = LanguageModel("m", dec, tok, art.manifest["decoder"]["eos_token_ids"], SamplingParams(), kind="onnx")
msgs = [{"role": "system", "content": "You are the gentle narrator of a calm text adventure."},
        {"role": "user", "content": "I step into a quiet forest at dusk. What do I notice?"}]
t = time.perf_counter()
ids = lm.encode_prompt(msgs)
events = generate_events(dec, tok, ids, SamplingParams(temperature=0, max_new_tokens=8), lm.eos_ids,
                         state=GenerationState(len(ids)))
next(events)
out["first_token"] = time.perf_counter() - t
out["total"] = time.perf_counter() - t0
events.close()
warm = []
for _ in range(3):  # the same prompt again, in the same process: TTFT once loaded
    t = time.perf_counter()
    ev = generate_events(dec, tok, ids, SamplingParams(temperature=0, max_new_tokens=2), lm.eos_ids,
                         state=GenerationState(len(ids)))
    next(ev)
    warm.append(time.perf_counter() - t)
    ev.close()
out["warm_ttft"] = sorted(warm)[1]
st = GenerationState(len(ids))
for _ in generate_events(dec, tok, ids, SamplingParams(temperature=0, max_new_tokens=64, min_new_tokens=64),
                         lm.eos_ids, state=st):
    pass
out["decode_tok_s"] = st.completion()["timings"]["decode_tokens_per_s"]
out["prompt_tokens"] = len(ids)
r = rss()
out.update(model_rss_mb=loaded - base, peak_rss_mb=r["VmHWM"], rss_after_first_token_mb=r["VmRSS"] - base)
print(json.dumps(out))
"""


MANAGER_CHILD = r"""
import asyncio, json, sys, time
t0 = time.perf_counter()
from tta_engine.manager import TransformersModelManager
from tta_engine.config import load_model_configs
out = {"import": time.perf_counter() - t0}
root, name, precision = sys.argv[1], sys.argv[2], sys.argv[3]
cfgs = load_model_configs()
if precision != cfgs[name].precision:
    import dataclasses
    cfgs[name] = dataclasses.replace(cfgs[name], precision=precision)
m = TransformersModelManager(cfgs, artifacts_root=root)
msgs = [{"role": "system", "content": "You are the gentle narrator of a calm text adventure."},
        {"role": "user", "content": "I step into a quiet forest at dusk. What do I notice?"}]
async def first():
    async for _ in m.astream(msgs, name, temperature=0, max_tokens=8):
        return time.perf_counter() - t0
out["total"] = asyncio.run(first())
with open("/proc/self/status") as f:
    out["peak_rss_mb"] = [int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM")][0]
m.close()
print(json.dumps(out))
"""


def manager_once(root: str, model: str, precision: str) -> dict:
    """New process -> first streamed token through the public API (manager, packaged configs)."""
    proc = subprocess.run([sys.executable, "-c", MANAGER_CHILD, root, model, precision], capture_output=True,
                          text=True, env=dict(os.environ), timeout=300)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_once(path: str, verify: bool, variant: dict, python: str = sys.executable) -> dict:
    proc = subprocess.run([python, "-c", CHILD, path, "1" if verify else "0", json.dumps(variant)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runtime-python", default=None,
                    help="the python of a runtime-only venv (`pip install .`, no torch): adds its row, same run")
    args = ap.parse_args()
    path = os.path.join(args.artifacts, args.model, args.precision)
    variants = {
        "runtime defaults, no hashing": (False, {}),
        "+ sha256 of every file on load": (True, {}),
        "prepacking off": (False, {"config": {"session.disable_prepacking": "1"}}),
        "CPU arena off": (False, {"arena": False}),
        "graph optimizations: basic": (False, {"opt_level": "ORT_ENABLE_BASIC"}),
        "without the int8 prefill graph": (False, {"no_prefill_graph": True}),
    }
    if args.runtime_python:
        variants["runtime-only venv (no torch installed)"] = (False, {}, args.runtime_python)
    samples: dict[str, list[dict]] = {k: [] for k in variants}
    run_once(path, False, {})  # page cache
    for rep in range(args.reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            verify, variant, python = (*variants[name], sys.executable)[:3]
            samples[name].append(run_once(path, verify, variant, python))
    keys = ["import", "manifest", "sessions", "tokenizer", "first_token", "total", "warm_ttft", "decode_tok_s",
            "model_rss_mb",
            "rss_after_first_token_mb", "peak_rss_mb"]
    print(f"{args.model} {args.precision}: median of {args.reps} fresh processes")
    print("| variant | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, rows in samples.items():
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        cells = [f"{med[k]:.0f}" if k.endswith("_mb") else f"{med[k]:.1f}" if k == "decode_tok_s" else f"{med[k]:.3f}"
                 for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    runs = [manager_once(args.artifacts, args.model, args.precision) for _ in range(args.reps)]
    print(f"public API (new process -> TransformersModelManager(...).astream first token), median of {args.reps}: "
          f"import {statistics.median(r['import'] for r in runs):.3f} s, total "
          f"{statistics.median(r['total'] for r in runs):.3f} s, peak RSS "
          f"{statistics.median(r['peak_rss_mb'] for r in runs):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
