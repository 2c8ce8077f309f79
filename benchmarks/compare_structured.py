"""Structured output on the int4 SmolLM2 default: constrained (llguidance) vs unconstrained + regex-extracted JSON,
and llama-cpp-python with its JSON-schema grammar on the same GGUF.

    .venv/bin/python benchmarks/compare_structured.py [--n 50] [--speed-n 10] [--no-llama-cpp]

Prints (and with --out writes as JSON) one run's figures:
- valid rate (parses + Pydantic validates) of 50 Character prompts and 50 tool-call prompts over 4 tools, with and
  without the constraint (the unconstrained text is scraped with a regex, as the game does today);
- constrained decode tok/s / unconstrained decode tok/s at batch 1 and with 8 concurrent streams (manager);
- mask time per token (fill: computing a mask; wait: the part the sampler waited for, i.e. not hidden
  behind the forward pass), p50 / p99 in microseconds;
- grammar compile time for Character: cold (tokenizer bridge + grammar) and cached;
- llama-cpp-python (if installed) with ``response_format={"type": "json_object", "schema": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench.report import machine_info  # noqa: E402
from game_models import TOOLS, Character, character_prompts, tool_prompts  # noqa: E402
from tta_engine import structured, tool_calls  # noqa: E402
from tta_engine.config import load_model_configs  # noqa: E402
from tta_engine.errors import StructuredOutputError  # noqa: E402
from tta_engine.manager import TransformersModelManager  # noqa: E402

NAME = "smollm2-135m-instruct"
# a whole Character (17 fields, lists, nested objects) takes up to ~900 tokens, as in the e2e tests; a
# call ~30 (unconstrained replies ramble on to the limit)
MAX_TOKENS = {"character": 900, "tool": 200}
_JSON = re.compile(r"\{.*\}", re.DOTALL)  # what the game does today: the outermost {...} of the reply


def valid_character(text: str, constrained: bool) -> bool:
    if not constrained:
        m = _JSON.search(text)
        if m is None:
            return False
        text = m.group(0)
    try:
        Character.model_validate_json(text)
        return True
    except Exception:  # noqa: BLE001 - any parse/validation failure counts as invalid
        return False


def valid_tool(text: str, constrained: bool) -> bool:
    try:
        tool_calls.parse_tool_call(text, TOOLS)
        return True
    except StructuredOutputError:
        return False


async def run_set(m, prompts, fmt, valid, *, streams: int, max_tokens: int | list[int],
                  exact_length: bool = False) -> dict:
    """All prompts with at most ``streams`` in flight; seeded sampling (temperature 0.7, top_p 0.95).
    ``max_tokens``: one limit, or one per prompt; ``exact_length``: each reply gets exactly that many
    tokens (min = max), so that a free run can be timed on the same lengths as a constrained one."""
    sem = asyncio.Semaphore(streams)
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)

    async def one(i, p):
        extra = {"min_new_tokens": limits[i]} if exact_length else {}
        async with sem:
            return await m.complete(p, NAME, response_format=fmt, max_tokens=limits[i], temperature=0.7,
                                    top_p=0.95, seed=i, **extra)

    t0 = time.perf_counter()
    outs = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    wall = time.perf_counter() - t0
    tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    decode_tokens = sum(max(o["usage"]["completion_tokens"] - 1, 0) for o in outs)
    decode_s = sum(o["timings"]["decode_s"] for o in outs if o["usage"]["completion_tokens"] > 1)
    return {"n": len(outs), "valid": sum(valid(o["text"], fmt is not None) for o in outs) / len(outs),
            "length_finishes": sum(o["finish_reason"] == "length" for o in outs),
            "mean_tokens": tokens / len(outs), "wall_s": wall, "aggregate_tok_s": tokens / wall,
            "decode_tok_s": decode_tokens / decode_s if decode_s else None,
            "lengths": [o["usage"]["completion_tokens"] for o in outs]}


def compile_times(lm, repeats: int = 200) -> dict:
    structured._grammar_cache.clear()
    structured._tok_cache.clear()
    structured._pydantic_schema.cache_clear()
    t0 = time.perf_counter()
    structured.ll_tokenizer(lm.tokenizer, lm.backend.vocab_size, lm.eos_ids[0])
    t1 = time.perf_counter()
    structured.compile_for_model(lm, Character)
    t2 = time.perf_counter()
    for _ in range(repeats):
        structured.compile_for_model(lm, Character).start().close()
    t3 = time.perf_counter()
    return {"tokenizer_bridge_ms": (t1 - t0) * 1e3, "character_cold_ms": (t2 - t1) * 1e3,
            "character_cached_ms": (t3 - t2) * 1e3 / repeats}


def percentiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64) * 1e6
    if a.size == 0:
        return {"p50_us": None, "p99_us": None, "count": 0}
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "count": int(a.size)}


def llama_cpp_side(cfg, prompts, max_tokens: int, n: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python not installed: skipped (pip install -e '.[compare]'; it compiles llama.cpp)")
        return None
    from tta_engine.sources import resolve_source

    src = resolve_source(cfg)
    llm = Llama(model_path=str(src.directory / src.gguf_file), n_ctx=2048, n_threads=2, n_threads_batch=2,
                verbose=False)
    schema = Character.model_json_schema()
    valid, tokens, seconds = 0, 0, 0.0
    for i, p in enumerate(prompts[:n]):
        t0 = time.perf_counter()
        out = llm.create_chat_completion(p, response_format={"type": "json_object", "schema": schema},
                                         max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=i)
        seconds += time.perf_counter() - t0
        tokens += out["usage"]["completion_tokens"]
        valid += valid_character(out["choices"][0]["message"]["content"], True)
    return {"n": n, "valid": valid / n, "tok_s_incl_prefill": tokens / seconds}


async def main_async(args) -> dict:
    cfgs = load_model_configs()
    m = TransformersModelManager(cfgs, artifacts_root=args.artifacts_root, max_batch=8)
    lm, _ = m.load_model(NAME)
    res: dict = {"machine": machine_info(), "compile": compile_times(lm), "max_tokens": MAX_TOKENS}
    sets = {"tool": (tool_prompts(args.n), tool_calls.tool_call_format(TOOLS), valid_tool),
            "character": (character_prompts(args.n), Character, valid_character)}
    await m.complete(sets["tool"][0][0], NAME, max_tokens=8)  # warm-up
    for kind, (prompts, fmt, valid) in sets.items():
        if kind not in args.sets:
            continue
        for label, f in (("constrained", fmt), ("unconstrained", None)):
            structured.MASK_TIMINGS["fill"].clear()
            structured.MASK_TIMINGS["wait"].clear()
            r8 = await run_set(m, prompts, f, valid, streams=8, max_tokens=MAX_TOKENS[kind])
            r1 = await run_set(m, prompts[: args.speed_n], f, valid, streams=1, max_tokens=MAX_TOKENS[kind])
            res[f"{kind}_{label}"] = {"streams8": r8, "batch1": r1}
            if f is not None:
                res[f"{kind}_mask"] = {"fill": percentiles(structured.MASK_TIMINGS["fill"]),
                                       "wait": percentiles(structured.MASK_TIMINGS["wait"])}
            print(kind, label, json.dumps(res[f"{kind}_{label}"]), flush=True)
        # the speed ratio on equal work: each free reply exactly as long as the constrained one was
        c = res[f"{kind}_constrained"]
        same = {"streams8": await run_set(m, prompts, None, valid, streams=8, max_tokens=c["streams8"]["lengths"],
                                          exact_length=True),
                "batch1": await run_set(m, prompts[: args.speed_n], None, valid, streams=1,
                                        max_tokens=c["batch1"]["lengths"], exact_length=True)}
        res[f"{kind}_unconstrained_same_length"] = same
        print(kind, "unconstrained, same lengths", json.dumps(same), flush=True)
        res[f"{kind}_ratio"] = {"batch1_decode": c["batch1"]["decode_tok_s"] / same["batch1"]["decode_tok_s"],
                                "streams8_aggregate": c["streams8"]["aggregate_tok_s"] / same["streams8"]["aggregate_tok_s"]}
    m.close()
    if args.llama_cpp and "character" in args.sets:
        res["llama_cpp_character"] = llama_cpp_side(cfgs[NAME], sets["character"][0], MAX_TOKENS["character"],
                                                     args.speed_n)
    return res


def table(res: dict) -> str:
    kinds = [k for k in ("character", "tool") if f"{k}_ratio" in res]
    rows = ["| figure | " + " | ".join({"character": "Character", "tool": "tool call"}[k] for k in kinds) + " |",
            "|---|" + "---|" * len(kinds)]
    for label in ("constrained", "unconstrained"):
        rows.append(f"| valid rate {label} ({res[f'{kinds[0]}_{label}']['streams8']['n']} prompts, 8 streams) | "
                    + " | ".join(f"{res[f'{k}_{label}']['streams8']['valid']:.0%}" for k in kinds) + " |")
    for label in ("constrained", "unconstrained"):
        rows.append(f"| decode tok/s {label}, batch 1 / 8 streams aggregate | "
                    + " | ".join(f"{res[f'{k}_{label}']['batch1']['decode_tok_s']:.1f} / "
                                 f"{res[f'{k}_{label}']['streams8']['aggregate_tok_s']:.1f}" for k in kinds)
                    + " |")
    rows.append("| decode tok/s unconstrained with the constrained replies' lengths, batch 1 / 8 streams aggregate | "
                + " | ".join(f"{res[f'{k}_unconstrained_same_length']['batch1']['decode_tok_s']:.1f} / "
                             f"{res[f'{k}_unconstrained_same_length']['streams8']['aggregate_tok_s']:.1f}" for k in kinds)
                + " |")
    rows.append("| constrained / unconstrained (same lengths) tok/s, batch 1 decode / 8 streams aggregate | "
                + " | ".join(f"{res[f'{k}_ratio']['batch1_decode']:.2f} / {res[f'{k}_ratio']['streams8_aggregate']:.2f}"
                             for k in kinds) + " |")
    rows.append("| mask fill µs/token p50 / p99 | " + " | ".join(
        f"{res[f'{k}_mask']['fill']['p50_us']:.0f} / {res[f'{k}_mask']['fill']['p99_us']:.0f}"
        for k in kinds) + " |")
    rows.append("| mask wait (not hidden by the forward pass) µs/token p50 / p99 | " + " | ".join(
        f"{res[f'{k}_mask']['wait']['p50_us']:.0f} / {res[f'{k}_mask']['wait']['p99_us']:.0f}"
        for k in kinds) + " |")
    c = res["compile"]
    rows.append(f"| compile ms: tokenizer bridge / Character cold / cached | {c['tokenizer_bridge_ms']:.0f} / "
                f"{c['character_cold_ms']:.1f} / {c['character_cached_ms']:.3f} |" + " |" * (len(kinds) - 1))
    rows.append("| tta constrained tok/s incl. prefill, batch 1 | " + " | ".join(
        f"{res[f'{k}_constrained']['batch1']['mean_tokens'] * res[f'{k}_constrained']['batch1']['n'] / res[f'{k}_constrained']['batch1']['wall_s']:.1f}"
        for k in kinds) + " |")
    lc = res.get("llama_cpp_character")
    if lc:
        rows.append(f"| llama-cpp-python JSON-schema grammar: valid / tok/s (incl. prefill, batch 1, {lc['n']} prompts) | "
                    f"{lc['valid']:.0%} / {lc['tok_s_incl_prefill']:.1f} |" + " n/a |" * (len(kinds) - 1))
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="prompts per set (valid rate, 8 streams)")
    ap.add_argument("--speed-n", type=int, default=10, help="prompts timed at batch 1")
    ap.add_argument("--artifacts-root", default=None)
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    ap.add_argument("--sets", nargs="+", default=["tool", "character"], choices=["tool", "character"])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    res = asyncio.run(main_async(args))
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
