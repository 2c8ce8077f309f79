"""Manager benchmarks (issue 4), ratios measured in one run on one artifact (default: SmolLM2 int4):

1. aggregate decode tokens/s with N concurrent streams / one stream      (target: 8 streams >= 4x)
2. second-turn time to first token with a shared ~500-token prefix / cold first turn  (target <= 0.1x)
3. manager overhead: decode tokens/s through the manager / the bare runtime            (target >= 0.95)

    python benchmarks/compare_manager.py [--precision int4] [--streams 1 2 4 8 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from tta_engine.artifact import artifact_dir, load_artifact
from tta_engine.config import load_model_configs
from tta_engine.manager import TransformersModelManager
from tta_engine.runtime import open_artifact_lm

WORLD = (
    "World state: the traveller stands at the edge of the Whispering Forest at dusk. To the north lies the old "
    "mill by the river, its wheel turning slowly; to the east a lantern-lit village where the baker, the "
    "blacksmith and the herbalist live; to the south the misty marsh; to the west the mountains. The traveller "
    "carries a lantern, a worn map, a flute and a small bag of bread. The mood is calm and gentle. "
)


def user(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me a short calming story about place number {i}."}]


async def concurrency(m: TransformersModelManager, name: str, streams: list[int], new_tokens: int) -> dict:
    out = {}
    await asyncio.gather(*[m.complete(user(i), name, max_tokens=8, temperature=0) for i in range(2)])  # warm-up
    for n in streams:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[m.complete(user(i), name, max_tokens=new_tokens, min_new_tokens=new_tokens,
                                                temperature=0) for i in range(n)])
        dt = time.perf_counter() - t0
        out[n] = sum(r["usage"]["completion_tokens"] for r in res) / dt
        print(f"  {n:2d} streams: {out[n]:7.1f} tok/s aggregate", flush=True)
    return out


async def prefix_reuse(m: TransformersModelManager, name: str, repeats: int) -> dict:
    tok = m.load_model(name)[1]
    system = {"role": "system", "content": WORLD * 5}
    print(f"  shared prefix: {len(tok.apply_chat_template([system], tokenize=True))} tokens", flush=True)
    # untimed: the first run of a ~500-token prompt pays ORT's one-time allocations (~1.5 s here)
    await m.complete([{"role": "system", "content": "Warm-up. " + system["content"]}], name, max_tokens=4,
                     temperature=0)
    cold, warm, at_once = [], [], []
    sched = m._loaded[name].scheduler
    for r in range(repeats):
        for think in (True, False):
            sys_r = {"role": "system", "content": f"Session {r}{'' if think else ' b'}. " + system["content"]}
            turn1 = [sys_r, {"role": "user", "content": "I walk towards the mill."}]
            first = await m.complete(turn1, name, max_tokens=16, temperature=0)
            turn2 = turn1 + [{"role": "assistant", "content": first["text"]},
                             {"role": "user", "content": "I open the door of the mill."}]
            while think and not sched.settled():  # the player's think-time: the reply's KV is recomputed
                await asyncio.sleep(0.005)        # on the prefill graph, so that turn 2 may reuse it
            second = await m.complete(turn2, name, max_tokens=16, temperature=0)
            if think:
                cold.append(first["timings"]["time_to_first_token_s"])
                warm.append(second["timings"]["time_to_first_token_s"])
            else:
                at_once.append(second["timings"]["time_to_first_token_s"])
    return {"cold_ttft_s": statistics.median(cold), "second_turn_ttft_s": statistics.median(warm),
            "second_turn_at_once_ttft_s": statistics.median(at_once)}


def llama_cpp_prefix_reuse(cfg, lm, repeats: int) -> dict | None:
    """The same two turns, token for token (``lm`` renders them), on llama-cpp-python with the GGUF file:
    it keeps the KV of its last sequence and evaluates only the tokens after the common prefix.
    None when llama-cpp-python or a GGUF is missing."""
    from bench.engines import EngineUnavailable, LlamaCppLM
    from tta_engine.sources import resolve_source

    src = resolve_source(cfg)
    if not src.gguf_file:
        return None
    engine = LlamaCppLM({"key": "llama.cpp", "path": str(src.directory / src.gguf_file), "n_ctx": 2048})
    try:
        engine.load()
    except EngineUnavailable as exc:
        print(f"  llama.cpp: skipped ({exc})", flush=True)
        return None
    system = {"role": "system", "content": WORLD * 5}
    cold, warm = [], []
    for r in range(repeats):
        sys_r = {"role": "system", "content": f"Session {r}. " + system["content"]}
        turn1 = [sys_r, {"role": "user", "content": "I walk towards the mill."}]
        engine.llm.reset()  # cold: nothing kept
        first = engine.generate(lm.encode_prompt(turn1), 16, stop_at_eos=True)
        turn2 = turn1 + [{"role": "assistant", "content": lm.tokenizer.decode(first.token_ids, skip_special_tokens=True)},
                         {"role": "user", "content": "I open the door of the mill."}]
        second = engine.generate(lm.encode_prompt(turn2), 16, stop_at_eos=True)  # reuses turn 1's KV
        cold.append(first.ttft_s)
        warm.append(second.ttft_s)
    engine.llm.close()
    return {"cold_ttft_s": statistics.median(cold), "second_turn_ttft_s": statistics.median(warm)}


async def overhead(m: TransformersModelManager, lm, name: str, new_tokens: int, repeats: int) -> dict:
    bare, managed = [], []
    prompt = user(0)
    for _ in range(repeats):  # alternate to spread machine noise over both
        c = lm.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
        bare.append(c["timings"]["decode_tokens_per_s"])
        c = await m.complete(prompt, name, max_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
        managed.append(c["timings"]["decode_tokens_per_s"])
    return {"bare_tok_s": statistics.median(bare), "manager_tok_s": statistics.median(managed)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--wide-step-rows", type=int, default=0,
                    help="manager throughput option: steps with >= N rows run on the int8 prefill graph (0: off)")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                    help="skip the llama-cpp-python prefix-reuse comparison")
    args = ap.parse_args(argv)

    cfgs = load_model_configs()
    cfg = cfgs[args.model]
    from dataclasses import replace

    cfgs[args.model] = cfg = replace(cfg, precision=args.precision)
    art = load_artifact(artifact_dir(args.artifacts, cfg.name, args.precision))
    m = TransformersModelManager(cfgs, artifacts_root=args.artifacts, wide_step_rows=args.wide_step_rows)
    lm = open_artifact_lm(art, cfg)

    async def run() -> dict:
        print(f"{cfg.name} {args.precision}: concurrency", flush=True)
        conc = await concurrency(m, cfg.name, args.streams, args.new_tokens)
        print("prefix reuse", flush=True)
        pref = await prefix_reuse(m, cfg.name, args.repeats)
        if args.llama_cpp:
            print("prefix reuse, llama-cpp-python", flush=True)
            pref_llama = llama_cpp_prefix_reuse(cfg, m.load_model(cfg.name)[0], args.repeats)
            if pref_llama:
                pref["llama_cpp"] = pref_llama
        print("manager overhead", flush=True)
        over = await overhead(m, lm, cfg.name, args.new_tokens * 2, args.repeats)
        return {"concurrency_tok_s": conc, "prefix": pref, "overhead": over}

    res = asyncio.run(run())
    m.close()
    lm.close()
    conc, pref, over = res["concurrency_tok_s"], res["prefix"], res["overhead"]
    base = conc[min(conc)]
    ratios = {f"aggregate_{n}_streams_vs_1": conc[n] / base for n in conc}
    ratios["second_turn_ttft_vs_cold"] = pref["second_turn_ttft_s"] / pref["cold_ttft_s"]
    ratios["second_turn_at_once_ttft_vs_cold"] = pref["second_turn_at_once_ttft_s"] / pref["cold_ttft_s"]
    if "llama_cpp" in pref:
        lc = pref["llama_cpp"]
        ratios["llama_cpp_second_turn_ttft_vs_cold"] = lc["second_turn_ttft_s"] / lc["cold_ttft_s"]
        ratios["second_turn_ttft_tta_vs_llama_cpp"] = pref["second_turn_ttft_s"] / lc["second_turn_ttft_s"]
    ratios["manager_vs_bare_tok_s"] = over["manager_tok_s"] / over["bare_tok_s"]
    res["ratios"] = ratios
    print("\n| ratio | value | target |\n|---|---|---|")
    targets = {"aggregate_8_streams_vs_1": ">= 4", "second_turn_ttft_vs_cold": "<= 0.1", "manager_vs_bare_tok_s": ">= 0.95"}
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} | {targets.get(k, '')} |")
    print(f"\ncold TTFT {pref['cold_ttft_s'] * 1000:.0f} ms, second turn {pref['second_turn_ttft_s'] * 1000:.0f} ms "
          f"(sent at once, before the reply was recomputed: {pref['second_turn_at_once_ttft_s'] * 1000:.0f} ms); "
          f"bare {over['bare_tok_s']:.1f} tok/s, manager {over['manager_tok_s']:.1f} tok/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
