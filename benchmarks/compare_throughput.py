"""Throughput (issue 21), every ratio measured in one run on one machine (default: SmolLM2-135M int4):

1. aggregate decode tok/s through the manager at 1/2/4/8/16 concurrent streams, ratio to 1 stream, and
   the share of the wall time spent outside the decode forward passes (Python, sampling, streaming);
2. where a batched step goes: one decode step of R rows on the artifact's graph (ms, tok/s) and ONNX
   Runtime's per-node profile grouped by component (MatMulNBits, the exact-grid offsets of GGUF Q4_1/K
   weights, GroupQueryAttention, the rest), plus the bytes a step must read (weights and KV) against
   the measured step time: the memory-bandwidth floor;
3. llama.cpp on the same GGUF through llama-cpp-python's low-level API: one decode step of R sequences
   in one ``llama_batch`` (its own batched decode, the same past length), tta ÷ llama.cpp at 1 and 8;
4. embeddings: sentences/s of tta fp32 / int8 vs sentence-transformers' ONNX backend, with cosines.

    .venv/bin/python benchmarks/compare_throughput.py [--rows 1 2 4 8 16] [--past 200] [--json out.json]
    .venv/bin/python benchmarks/compare_throughput.py --quick      # fewer steps, no embeddings
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import bench
import numpy as np
from tta_engine.artifact import artifact_dir, load_artifact
from tta_engine.config import get_config, load_model_configs

TARGETS = {"aggregate_8_streams_vs_1": (">=", 6.0), "tta_8_rows_vs_llama_cpp_8_sequences": (">=", 1.5),
           "tta_1_row_vs_llama_cpp_1_sequence": (">=", 1.3), "outside_forward_share_1_stream": ("<=", 0.05),
           "embed_fp32_vs_st_onnx": (">=", 1.5), "embed_int8_min_cosine": (">=", 0.999)}


def _median_step(run, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times[max(1, steps // 6):]))


# -- 1. the manager -------------------------------------------------------------------------------------
def manager_streams(cfg, root, streams: list[int], new_tokens: int) -> dict:
    from tta_engine.manager import TransformersModelManager

    m = TransformersModelManager({cfg.name: cfg}, artifacts_root=root)
    backend = m.load_model(cfg.name)[0].backend
    spent: list[float] = []
    forward = backend.forward

    def timed(cache, ids, **kw):  # decode steps and prefill chunks, both ORT runs
        t = time.perf_counter()
        try:
            return forward(cache, ids, **kw)
        finally:
            spent.append(time.perf_counter() - t)

    backend.forward = timed

    async def run() -> dict:
        def msgs(i):
            return [{"role": "user", "content": f"Tell me a short calming story about place number {i}."}]

        await asyncio.gather(*[m.complete(msgs(i), cfg.name, max_tokens=8, temperature=0) for i in range(2)])
        out = {}
        for n in streams:  # untimed first: ORT's first run at a shape allocates its buffers
            await asyncio.gather(*[m.complete(msgs(i), cfg.name, max_tokens=4, temperature=0) for i in range(n)])
            spent.clear()
            t0 = time.perf_counter()
            res = await asyncio.gather(*[m.complete(msgs(i), cfg.name, max_tokens=new_tokens,
                                                    min_new_tokens=new_tokens, temperature=0) for i in range(n)])
            wall = time.perf_counter() - t0
            tokens = sum(r["usage"]["completion_tokens"] for r in res)
            out[n] = {"tok_s": tokens / wall, "outside_forward_share": max(0.0, 1 - sum(spent) / wall)}
            print(f"  {n:2d} streams: {out[n]['tok_s']:7.1f} tok/s aggregate, "
                  f"{100 * out[n]['outside_forward_share']:4.1f}% of the time outside ORT runs", flush=True)
        return out

    try:
        return asyncio.run(run())
    finally:
        m.close()


# -- 2. one step of R rows, and where it goes ------------------------------------------------------------
_OFFSET_SUFFIXES = (".block_sum", ".block_sum.blocks", ".offset", "MatMul.add")


def _component(node: str, op: str) -> str:
    if op in ("MatMul", "Add", "Reshape", "ReduceSum") and node.endswith(_OFFSET_SUFFIXES):
        return "exact-grid offsets (block sums, MatMul, Add)"
    if op in ("MatMulNBits", "GroupQueryAttention"):
        return op
    return "other ops"


def _decoder(art, threads, profile_prefix=None):
    from tta_engine.ort_decoder import OrtDecoder
    from tta_engine.ort_session import create_session

    dec = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"], threads=threads, device="cpu")
    if profile_prefix:
        dec.session = create_session(art.file("model.onnx"), threads=threads, device="cpu",
                                     profile_prefix=profile_prefix)
    return dec


def _filled_cache(dec, rows: int, past: int, rng):
    cache = dec.new_cache(rows, capacity=past + 256)
    dec.prefill(cache, rng.integers(100, dec.vocab_size - 100, (rows, past)))
    return cache


def _tta_step(dec, cache, past: int, rng) -> None:
    dec.forward(cache, rng.integers(100, dec.vocab_size - 100, (cache.batch, 1)))
    cache.lengths[:] = past  # every step at the same past length


def tta_steps(art, rows: list[int], past: int, steps: int, threads: int | None) -> dict[int, float]:
    dec, rng, out = _decoder(art, threads), np.random.default_rng(0), {}
    for r in rows:
        cache = _filled_cache(dec, r, past, rng)
        out[r] = _median_step(functools.partial(_tta_step, dec, cache, past, rng), steps)
        print(f"  tta {r:2d} rows: step {out[r] * 1e3:6.2f} ms, {r / out[r]:6.1f} tok/s", flush=True)
        cache.close()
    dec.close()
    return out


def tta_profile(art, rows: list[int], past: int, steps: int, threads: int | None) -> dict[int, dict[str, float]]:
    """ms per step per component, from ONNX Runtime's profiler (which adds its own overhead per node)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            dec, rng = _decoder(art, threads, profile_prefix=f"{tmp}/rows{r}"), np.random.default_rng(0)
            cache = _filled_cache(dec, r, past, rng)
            for _ in range(steps):
                _tta_step(dec, cache, past, rng)
            events = json.loads(Path(dec.session.end_profiling()).read_text())
            runs = [e for e in events if e.get("name") == "model_run"][-(steps - 2):]
            start = runs[0]["ts"]
            per = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                    per[_component(e["name"][: -len("_kernel_time")], e["args"]["op_name"])] += e["dur"]
            out[r] = {k: v / len(runs) / 1e3 for k, v in per.most_common()}
            out[r]["model_run"] = sum(e["dur"] for e in runs) / len(runs) / 1e3
            print(f"  profile, {r} rows: " + ", ".join(f"{k} {v:.2f} ms" for k, v in out[r].items()), flush=True)
            cache.close()
            dec.close()
    return out


def bytes_per_step(art, rows: list[int], past: int) -> dict[int, dict[str, float]]:
    """What a decode step of R rows reads at least, per R: every initializer of the decode graph (the
    embedding lookup aside, a row per token) and each row's K/V for ``past`` positions."""
    import onnx

    model = onnx.load(str(art.file("model.onnx")), load_external_data=False)
    weights = sum(len(i.raw_data) or i.ByteSize() for i in model.graph.initializer) / 1e6
    meta = art.manifest["decoder"]
    kv_row = past * meta["num_layers"] * meta["num_kv_heads"] * meta["head_dim"] * 2 * 4 / 1e6
    return {r: {"weights_mb": weights, "kv_mb": r * kv_row} for r in rows}


# -- 3. llama.cpp's own batched decode -------------------------------------------------------------------
def _llama_decode(L, ctx, batch, items) -> None:
    """One ``llama_decode`` of (token, position, sequence id, wants logits) items."""
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, logits) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(tok), pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits
    if L.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def _llama_step(L, ctx, batch, rows: int, pos: list[int], vocab: int, rng) -> None:
    _llama_decode(L, ctx, batch, [(rng.integers(100, vocab - 100), pos[0], s, True) for s in range(rows)])
    L.llama_get_logits(ctx)
    pos[0] += 1


def llama_cpp_steps(gguf: Path, rows: list[int], past: int, steps: int, threads: int) -> dict[int, float]:
    import llama_cpp as L

    quiet = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(quiet, ctypes.c_void_p())
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    rng, out = np.random.default_rng(0), {}
    try:
        for r in rows:
            cp = L.llama_context_default_params()
            cp.n_ctx = r * (past + steps + 8) + 64
            cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 2048, 512, r, True
            cp.n_threads = cp.n_threads_batch = threads
            ctx = L.llama_init_from_model(model, cp)
            batch = L.llama_batch_init(2048, 0, r)
            for s in range(r):
                prompt = rng.integers(100, vocab - 100, past)
                _llama_decode(L, ctx, batch, [(t, p, s, p == past - 1) for p, t in enumerate(prompt)])
            out[r] = _median_step(functools.partial(_llama_step, L, ctx, batch, r, [past], vocab, rng), steps)
            print(f"  llama.cpp {r:2d} sequences: step {out[r] * 1e3:6.2f} ms, {r / out[r]:6.1f} tok/s", flush=True)
            L.llama_batch_free(batch)
            L.llama_free(ctx)
    finally:
        L.llama_model_free(model)
    return out


# -- 4. embeddings ---------------------------------------------------------------------------------------
def embeddings(root, out_dir: Path) -> dict:
    cfg = get_config(load_model_configs(), "all-minilm-l6-v2")
    rec = bench.compare_embed(cfg, artifacts_root=root, out_dir=out_dir, settings=bench.BenchSettings(),
                              engines=["tta-fp32", "tta-int8", "st-onnx", "st-torch"])
    return {"engines": {k: {m: v.get(m) for m in ("sentences_s", "min_cosine")} for k, v in rec["engines"].items()},
            "skipped": rec["skipped"]}


def _summary(figure):
    return figure["median"] if isinstance(figure, dict) else figure


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--past", type=int, default=200, help="KV positions each row already holds")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="ORT / llama.cpp threads (default: physical cores)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.new_tokens = 12, 24

    from dataclasses import replace

    from tta_engine.ort_session import physical_cores
    from tta_engine.sources import resolve_source

    threads = args.threads or physical_cores()
    cfg = replace(get_config(load_model_configs(), args.model), precision=args.precision)
    art = load_artifact(artifact_dir(args.artifacts, cfg.name, args.precision))
    info = bench.machine_info()
    print(f"{info['cpu']} ({info.get('physical_cores')} cores; {', '.join(info['isa'])}), {threads} threads; "
          f"{cfg.name} {args.precision}, past {args.past} positions per row", flush=True)
    res: dict = {"machine": info, "model": cfg.name, "precision": args.precision, "past": args.past}
    print("1. manager, concurrent streams", flush=True)
    res["streams"] = manager_streams(cfg, args.artifacts, args.rows, args.new_tokens)
    print("2. one decode step of R rows", flush=True)
    res["tta_step_s"] = tta_steps(art, args.rows, args.past, args.steps, threads)
    res["profile_ms"] = tta_profile(art, [min(args.rows), 8 if 8 in args.rows else max(args.rows)], args.past,
                                    max(args.steps // 2, 8), threads)
    res["bytes"] = bytes_per_step(art, args.rows, args.past)
    resolved = resolve_source(cfg)
    if resolved.gguf_file:
        print("3. llama.cpp, one llama_batch of R sequences (same GGUF)", flush=True)
        try:
            res["llama_cpp_step_s"] = llama_cpp_steps(resolved.directory / resolved.gguf_file, args.rows,
                                                      args.past, args.steps, threads)
        except ImportError as exc:
            print(f"  skipped: {exc} (pip install llama-cpp-python)", flush=True)
    if not args.quick:
        print("4. embeddings", flush=True)
        res["embeddings"] = embeddings(args.artifacts, args.out)

    ratios, one = {}, min(res["streams"])
    for n, fig in res["streams"].items():
        ratios[f"aggregate_{n}_streams_vs_1"] = fig["tok_s"] / res["streams"][one]["tok_s"]
    ratios["outside_forward_share_1_stream"] = res["streams"][one]["outside_forward_share"]
    steps = res["tta_step_s"]
    for r in args.rows:
        ratios[f"tta_{r}_rows_vs_1_row_tok_s"] = (r / steps[r]) / (1 / steps[min(steps)])
    lc = res.get("llama_cpp_step_s")
    if lc:
        for r in args.rows:
            ratios[f"llama_cpp_{r}_sequences_vs_1_tok_s"] = (r / lc[r]) / (1 / lc[min(lc)])
        ratios["tta_1_row_vs_llama_cpp_1_sequence"] = lc[min(lc)] / steps[min(steps)]
        if 8 in lc:
            ratios["tta_8_rows_vs_llama_cpp_8_sequences"] = lc[8] / steps[8]
        ratios["manager_8_streams_vs_llama_cpp_8_sequences"] = (
            res["streams"].get(8, {}).get("tok_s", float("nan")) / (8 / lc[8]) if 8 in lc else float("nan"))
    for r in args.rows:
        b = res["bytes"][r]
        ratios[f"effective_gb_s_{r}_rows"] = (b["weights_mb"] + b["kv_mb"]) / 1e3 / steps[r]
    emb = res.get("embeddings", {}).get("engines", {})
    if "tta-fp32" in emb and "st-onnx" in emb:
        ratios["embed_fp32_vs_st_onnx"] = _summary(emb["tta-fp32"]["sentences_s"]) / _summary(
            emb["st-onnx"]["sentences_s"])
        ratios["embed_fp32_min_cosine"] = emb["tta-fp32"]["min_cosine"]
    if "tta-int8" in emb and "st-onnx" in emb:
        ratios["embed_int8_vs_st_onnx"] = _summary(emb["tta-int8"]["sentences_s"]) / _summary(
            emb["st-onnx"]["sentences_s"])
        ratios["embed_int8_min_cosine"] = emb["tta-int8"]["min_cosine"]
    res["ratios"] = ratios
    print("\n| ratio | value | target |\n|---|---:|---|")
    for k, v in ratios.items():
        op, limit = TARGETS.get(k, (None, None))
        verdict = "" if op is None or v != v else (" OK" if (v >= limit if op == ">=" else v <= limit) else " MISSED")
        shown = f"{v:.6g}" if "cosine" in k else f"{v:.3f}"
        print(f"| {k} | {shown} | {'' if op is None else f'{op} {limit:g}'}{verdict} |")
    b1 = res["bytes"][min(args.rows)]
    print(f"\na decode step reads >= {b1['weights_mb']:.0f} MB of weights (+ {b1['kv_mb']:.1f} MB KV per row at "
          f"{args.past} positions); per-component profile above (ms per step, profiler overhead included)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
