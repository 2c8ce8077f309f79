"""Side-by-side decode comparison (issue 3's speed targets) for one causal LM, in one process.

Same weights, same ~270-token chat prompt (system prompt + world state through the chat template),
batch 1, 128 new tokens, greedy with min_new_tokens so EOS never ends a run early; every engine is
warmed up, then runs in alternating order; medians are reported.

Engines: tta-engine int4 / int8 / fp32 artifacts; Optimum ORTModelForCausalLM fp32 and int8 (its own export
of the same PyTorch model, int8 by ORTQuantizer with AutoQuantizationConfig.<this CPU>(is_static=False,
per_channel=True); cached under <out>/cache/); Transformers PyTorch fp32 ``generate``; llama-cpp-python on the
same GGUF file, onnxruntime-genai and Transformers + bitsandbytes when installed (else one skip line each,
with the install command).

    .venv/bin/python benchmarks/compare_decode.py                      # full: 3 reps x 128 tokens
    .venv/bin/python benchmarks/compare_decode.py --quick              # 2 reps x 64 tokens
    .venv/bin/python benchmarks/compare_decode.py --engine tta-int4 --engine optimum-int8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench
from tta_engine.config import get_config, load_model_configs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="output dir (JSON) and cache/")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--new-tokens", dest="new_tokens", type=int, default=None)
    ap.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=None)
    ap.add_argument("--engine", dest="engines", action="append", default=None, help="engine key prefix; repeatable")
    ap.add_argument("--no-fidelity", dest="fidelity", action="store_false")
    ap.add_argument("--rss", choices=["subprocess", "delta", "off"], default="off",
                    help="memory / cold-start figures (default off here; `tta-engine bench` measures them)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    base = bench.BenchSettings.quick() if args.quick else bench.BenchSettings()
    settings = base.replace(reps=args.reps, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                            rss=args.rss, threads=args.threads, fidelity=args.fidelity)
    cfg = get_config(load_model_configs(args.config), args.model)
    rec = bench.compare_decode(cfg, artifacts_root=args.artifacts, out_dir=args.out, settings=settings,
                               engines=args.engines)
    print(f"\n{cfg.name}: prompt {rec.get('prompt_tokens')} tokens, {settings.new_tokens} new tokens, "
          f"{settings.reps} reps (medians)")
    bench.print_decode_table(rec)
    bench.write_comparison(rec, settings, cfg.name, args.out, "compare_decode.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
