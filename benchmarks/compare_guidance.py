"""Guidance and Pydantic-AI on tta-engine vs guidance's own model classes, on the SmolLM2 default.

    .venv/bin/python benchmarks/compare_guidance.py [--runs 5] [--pyai-runs 10] [--out FILE]

One process, one run, the same weights everywhere:
- a guidance program of 3 steps (``select``, ``gen(stop=...)``, ``gen(regex=...)``) after a ~300-token
  system prefix, ``--runs`` times with different player lines (same prefix), on
  ``TTAEngine`` (the int4 artifact) and on guidance's ``models.Transformers`` over the same GGUF,
  dequantized by Transformers (PyTorch fp32), and ``models.LlamaCpp`` (same GGUF) when llama-cpp-python is
  installed. Each run's wall time; the first run on a fresh model is reported apart (cold KV);
- prefix tokens re-prefilled across one program's steps on tta-engine: tokens run through the model minus
  the tokens the finished program holds (0 = every step prefilled only its new text);
- Pydantic-AI ``Agent.run_sync`` to a validated Character (examples/pydantic_character.py), p50 / p90.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "examples"))  # pydantic_character: the example agent
from bench.report import machine_info  # noqa: E402

NAME = "smollm2-135m-instruct"
LORE = (
    "You are the narrator of Ember Hollow, a calm, therapeutic text adventure. The player walks through a "
    "valley of lantern-lit villages, slow rivers and quiet forests. Every scene is gentle: there is no "
    "combat, no death and no failure, only small discoveries, kind strangers and moments to rest. The "
    "villages are Mossgate, where the baker Ilsa trades bread for stories; Reedwater, a fishing hamlet on "
    "stilts whose ferryman Tomas hums old songs; and Highfold, a hill town with a bell tower that rings at "
    "dusk. The forest paths are marked with blue ribbons tied by the Wardens, quiet rangers who help lost "
    "travellers and tend the glowing moss. The river Calder is safe to wade in summer and freezes into a "
    "skating path in winter. Animals are friendly: foxes follow travellers at a distance, herons stand in "
    "the shallows, and the old badger under the mill bridge is said to remember every visitor. The player "
    "carries a satchel with a notebook, a flask of tea, a small lantern and a map that redraws itself as "
    "they explore. When the player feels anxious, the narrator slows the pace, describes the surroundings "
    "with soft sensory detail, and offers a breathing exercise. When the player is curious, the narrator "
    "reveals a small secret of the valley. Answer in short, warm sentences, stay in the world, and never "
    "mention that you are a model. The current season is late autumn; the light is golden and the air "
    "smells of woodsmoke and apples."
)
LINES = ["I sit by the river and listen.", "I follow the blue ribbons into the forest.",
         "I ask Ilsa for a story.", "I climb the bell tower at dusk.", "I feel a little anxious today.",
         "I look for the old badger.", "I open my notebook.", "I wade into the shallows."]
MOODS = ["calm", "curious", "anxious", "joyful"]


def program():
    import guidance
    from guidance import assistant, gen, select, system, user

    @guidance(dedent=False)
    def scene(lm, line: str):
        with system():
            lm += LORE
        with user():
            lm += line
        with assistant():
            lm += "Mood: " + select(MOODS, name="mood") + "\n"
            # no stop string: every engine writes exactly 30 tokens here (unless its model ends the turn),
            # so the engines do the same work although int4 and fp32 weights write different words
            lm += "Narrator: " + gen("reply", max_tokens=30) + "\n"
            lm += "Calm level (1-9): " + gen("level", regex=r"[1-9]")
        return lm

    return scene


def time_runs(model, runs: int, tokenizer=None) -> dict:
    """``tokenizer``: a guidance tokenizer to count the reply's tokens with (the same for every engine)."""
    scene = program()
    times, outs = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        out = model + scene(LINES[i % len(LINES)])
        times.append(time.perf_counter() - t0)
        outs.append({"mood": out["mood"], "level": out["level"], "reply": out["reply"][:60],
                     "reply_tokens": len(tokenizer.encode(out["reply"].encode())) if tokenizer else None})
    warm = times[1:] or times
    return {"first_s": times[0], "warm_median_s": statistics.median(warm), "warm_total_s": sum(warm),
            "times_s": times, "sample": outs[0], "reply_tokens": [o["reply_tokens"] for o in outs]}


def tta_side(manager, runs: int) -> dict:
    from tta_engine.integrations.guidance import TTAEngine, engine_of

    model = TTAEngine(NAME, manager)
    res = time_runs(model, runs, engine_of(model).tokenizer)
    # re-prefill on one fresh engine: tokens run through the model vs tokens the program ends with
    fresh = TTAEngine(NAME, manager)
    out = fresh + program()(LINES[0])
    eng = engine_of(out)
    final = len(eng.tokenizer.encode(str(out).encode()))
    res["one_program"] = {"prefilled_tokens": eng.stats.prefilled_tokens, "reused_tokens": eng.stats.reused_tokens,
                          "forward_passes": eng.stats.forward_passes, "final_tokens": final,
                          "re_prefilled": eng.stats.prefilled_tokens - final}
    return res


def transformers_side(cfg, runs: int, counter) -> dict:
    import guidance
    import torch
    from tokenizers import Tokenizer as RustTokenizer
    from tta_engine import structured
    from tta_engine.sources import load_tokenizer, load_torch_causal_lm, resolve_source

    torch.set_num_threads(2)
    resolved = resolve_source(cfg)
    t0 = time.perf_counter()
    hf_model = load_torch_causal_lm(cfg, resolved)
    tok = load_tokenizer(cfg, resolved)
    # Transformers' GGUF converter gives SmolLM2's byte-level tokenizer a decoder Sequence that llguidance
    # reads literally ('Ġ'): guidance then rejects its own forced tokens ("token ':' doesn't satisfy the
    # grammar"). Apply the repair the engine applies (engine/structured.py) so the comparison can run.
    state = json.loads(tok.backend_tokenizer.to_str())
    structured._simplify_decoder(state)
    tok._tokenizer = RustTokenizer.from_str(json.dumps(state))
    model = guidance.models.Transformers(hf_model, tok, echo=False, enable_monitoring=False)
    load = time.perf_counter() - t0
    return {"load_s": load, **time_runs(model, runs, counter)}


def llamacpp_side(cfg, runs: int, counter) -> dict | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed: guidance's models.LlamaCpp skipped (pip install -e '.[compare]')")
        return None
    import guidance
    from tta_engine.sources import resolve_source

    src = resolve_source(cfg)
    model = guidance.models.LlamaCpp(str(src.directory / src.gguf_file), n_ctx=2048, n_threads=2,
                                     n_threads_batch=2, echo=False, enable_monitoring=False, verbose=False)
    return time_runs(model, runs, counter)


def pydantic_ai_side(manager, runs: int) -> dict:
    from pydantic_character import make_agent

    agent = make_agent(NAME, manager)
    prompts = ["Create a wise mentor character", "Create a shy baker", "Create a cheerful ferryman",
               "Create a quiet forest warden", "Create a curious child explorer"]
    agent.run_sync(prompts[0])  # warm: grammar compiled, model loaded
    times, valid = [], 0
    for i in range(runs):
        t0 = time.perf_counter()
        res = agent.run_sync(prompts[i % len(prompts)])
        times.append(time.perf_counter() - t0)
        valid += res.output.goal.strip() != ""
    times.sort()
    return {"runs": runs, "p50_s": statistics.median(times), "p90_s": times[int(0.9 * (len(times) - 1))],
            "valid": valid / runs}


def table(res: dict) -> str:
    t, h, lc = res["tta"], res.get("transformers"), res.get("llamacpp")
    rows = ["| figure | tta-engine (int4) | guidance models.Transformers (fp32) | guidance models.LlamaCpp |",
            "|---|---|---|---|"]

    def cell(r, key):
        return f"{r[key]:.2f} s" if r else "n/a"

    rows.append(f"| 3-step program over a {res['prefix_tokens']}-token prefix, warm run median | "
                f"{cell(t, 'warm_median_s')} | {cell(h, 'warm_median_s')} | {cell(lc, 'warm_median_s')} |")
    rows.append(f"| same, first run on a fresh model | {cell(t, 'first_s')} | {cell(h, 'first_s')} | "
                f"{cell(lc, 'first_s')} |")

    def toks(r):
        return " ".join(str(n) for n in r["reply_tokens"]) if r else "n/a"

    rows.append(f"| reply tokens per run (same work) | {toks(t)} | {toks(h)} | {toks(lc)} |")
    if h:
        rows.append(f"| tta-engine ÷ Transformers (warm median / first run) | "
                    f"{t['warm_median_s'] / h['warm_median_s']:.3f} / {t['first_s'] / h['first_s']:.3f} | | |")
    if lc:
        rows.append(f"| tta-engine ÷ LlamaCpp (warm median / first run) | "
                    f"{t['warm_median_s'] / lc['warm_median_s']:.3f} / {t['first_s'] / lc['first_s']:.3f} | | |")
    o = t["one_program"]
    rows.append(f"| tokens re-prefilled in one program (prefilled {o['prefilled_tokens']} − final "
                f"{o['final_tokens']}) | {o['re_prefilled']} | | |")
    p = res.get("pydantic_ai")
    if p:
        rows.append(f"| Pydantic-AI run_sync → validated Character, p50 / p90 ({p['runs']} runs) | "
                    f"{p['p50_s']:.2f} / {p['p90_s']:.2f} s | | |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="program runs per model (the first is cold)")
    ap.add_argument("--pyai-runs", type=int, default=10)
    ap.add_argument("--artifacts-root", default=None)
    ap.add_argument("--no-transformers", dest="transformers", action="store_false")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    from tta_engine.config import load_model_configs
    from tta_engine.manager import TransformersModelManager

    cfgs = load_model_configs()
    manager = TransformersModelManager(cfgs, artifacts_root=args.artifacts_root, threads=2)
    lm, _ = manager.load_model(NAME)
    prefix = len(lm.encode_prompt([{"role": "system", "content": LORE}]))
    res: dict = {"machine": machine_info(), "prefix_tokens": prefix, "runs": args.runs}
    res["tta"] = tta_side(manager, args.runs)
    from tta_engine.integrations.guidance import TTAGuidanceTokenizer

    counter = TTAGuidanceTokenizer(lm.tokenizer, lm.eos_ids[0])  # counts every engine's reply tokens alike
    print("tta-engine", json.dumps(res["tta"]), flush=True)
    res["pydantic_ai"] = pydantic_ai_side(manager, args.pyai_runs)
    print("pydantic-ai", json.dumps(res["pydantic_ai"]), flush=True)
    manager.close()
    if args.transformers:
        res["transformers"] = transformers_side(cfgs[NAME], args.runs, counter)
        print("transformers", json.dumps(res["transformers"]), flush=True)
    if args.llama_cpp:
        res["llamacpp"] = llamacpp_side(cfgs[NAME], args.runs, counter)
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
