"""Throughput through the model manager: N concurrent streams, and one request's overhead vs the
LanguageModel directly. Both are skipped while ``tta_engine.manager`` does not exist."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from .measure import alternating, median, ratio
from .prompts import STREAM_ACTIONS, chat_prompt_ids


def bench_concurrency(cfg, artifacts_root, streams: Sequence[int], new_tokens: int, max_prompt: int, *,
                      threads=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Aggregate tok/s with N concurrent streams through the model manager (continuous batching).

    Separate from the rest so that it can be skipped while ``tta_engine.manager`` does not exist."""
    import asyncio

    try:
        from tta_engine.manager import TransformersModelManager
    except ImportError as exc:
        return {"skipped": f"tta_engine.manager is not available ({exc}); concurrency is measured through it"}
    from tta_engine.artifact import artifact_dir

    if not (artifact_dir(artifacts_root, cfg.name, cfg.precision) / "manifest.json").is_file():
        return {"skipped": f"no {cfg.precision} artifact for {cfg.name}: run `tta-engine export {cfg.name}`"}
    mgr = TransformersModelManager({cfg.name: cfg}, artifacts_root=artifacts_root, threads=threads,
                                   max_batch=max(streams), max_queue=max(64, 2 * max(streams)))
    try:
        lm, _ = mgr.load_model(cfg.name)
        prompts = [chat_prompt_ids(lm.tokenizer, max_prompt, STREAM_ACTIONS[i % len(STREAM_ACTIONS)])
                   for i in range(max(streams))]
        texts = [lm.tokenizer.decode(p) for p in prompts]  # raw text: the same ids for every request

        async def run(n: int, tokens: int):
            async def one(i: int):
                return await mgr.complete(texts[i], cfg.name, temperature=0.0, max_tokens=tokens,
                                          min_new_tokens=tokens)
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(i) for i in range(n)))
            return time.perf_counter() - t0, res

        asyncio.run(run(min(2, max(streams)), 8))  # warm-up (also primes the prefix cache, as in a game)
        rows = {}
        for n in streams:
            wall, res = asyncio.run(run(n, new_tokens))
            toks = sum(c["usage"]["completion_tokens"] for c in res)
            rows[str(n)] = {"aggregate_tok_s": toks / wall, "wall_s": wall, "completion_tokens": toks,
                            "per_stream_decode_tok_s": median(c["timings"]["decode_tokens_per_s"] for c in res),
                            "mean_ttft_s": statistics.mean(c["timings"]["time_to_first_token_s"] for c in res)}
            log(f"  {n:2d} streams: {rows[str(n)]['aggregate_tok_s']:7.1f} tok/s aggregate, "
                f"{rows[str(n)]['per_stream_decode_tok_s']:.1f} tok/s per stream, "
                f"mean TTFT {rows[str(n)]['mean_ttft_s'] * 1000:.0f} ms")
        return {"engine": f"tta-{cfg.precision} via TransformersModelManager", "new_tokens": new_tokens,
                "streams": rows}
    finally:
        mgr.close()


def bench_manager_overhead(cfg, artifacts_root, new_tokens: int, reps: int, max_prompt: int, *, threads=None,
                           pause_s: float = 0.1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One request through the manager vs the same request on the LanguageModel directly (prefix cache
    off, so that both prefill the whole prompt). Skipped while ``tta_engine.manager`` does not exist."""
    import asyncio

    try:
        from tta_engine.manager import TransformersModelManager
    except ImportError as exc:
        return {"skipped": f"tta_engine.manager is not available ({exc})"}
    from tta_engine.artifact import artifact_dir, load_artifact
    from tta_engine.runtime import open_artifact_lm

    path = artifact_dir(artifacts_root, cfg.name, cfg.precision)
    if not (path / "manifest.json").is_file():
        return {"skipped": f"no {cfg.precision} artifact for {cfg.name}: run `tta-engine export {cfg.name}`"}
    try:
        mgr = TransformersModelManager({cfg.name: cfg}, artifacts_root=artifacts_root, threads=threads,
                                       prefix_cache_entries=0)
    except TypeError:
        mgr = TransformersModelManager({cfg.name: cfg}, artifacts_root=artifacts_root, threads=threads)
    direct = open_artifact_lm(load_artifact(path), cfg, threads=threads)
    try:
        mgr.load_model(cfg.name)
        text = direct.tokenizer.decode(chat_prompt_ids(direct.tokenizer, max_prompt))
        kw = dict(temperature=0.0, max_tokens=new_tokens, min_new_tokens=new_tokens)

        def via_direct():
            t0 = time.perf_counter()
            c = direct.generate(text, **kw)
            return time.perf_counter() - t0, c

        def via_manager():
            t0 = time.perf_counter()
            c = asyncio.run(mgr.complete(text, cfg.name, **kw))
            return time.perf_counter() - t0, c

        runs = {"direct": [], "manager": []}
        fns = [("direct", via_direct), ("manager", via_manager)]
        for _, fn in fns:
            fn()
        for rep in range(reps):
            for name, fn in alternating(fns, rep):
                time.sleep(pause_s)
                runs[name].append(fn())
        out = {}
        for name, rs in runs.items():
            out[name] = {"total_s": median(r[0] for r in rs),
                         "ttft_s": median(r[1]["timings"]["time_to_first_token_s"] for r in rs),
                         "decode_tok_s": median(r[1]["timings"]["decode_tokens_per_s"] for r in rs)}
        out["overhead_ms_per_request"] = 1000 * (out["manager"]["total_s"] - out["direct"]["total_s"])
        out["ttft_overhead_ms"] = 1000 * (out["manager"]["ttft_s"] - out["direct"]["ttft_s"])
        out["decode_ratio"] = ratio([out["manager"]["decode_tok_s"]], [out["direct"]["decode_tok_s"]])
        out["new_tokens"] = new_tokens
        log(f"  manager overhead: {out['overhead_ms_per_request']:+.1f} ms per {new_tokens}-token request, "
            f"TTFT {out['ttft_overhead_ms']:+.1f} ms, decode ratio {out['decode_ratio']:.3f}")
        return out
    finally:
        mgr.close()
        direct.close()
