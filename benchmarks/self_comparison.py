"""The benchmark suite's noise floor: one artifact timed against itself under two names, interleaved.

Every ratio should come out near 1 (the README's tables are only as good as this); this replaces the
timing assertions that tests/test_bench.py used to make, which failed on a busy machine. Prints each ratio
and whether it lies in [0.5, 2]; exit status 1 if one does not.

    .venv/bin/python benchmarks/self_comparison.py                      # smollm2-135m-instruct int4
    .venv/bin/python benchmarks/self_comparison.py --precision fp32 --reps 9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tta_engine import bench
from tta_engine.artifact import artifact_dir
from tta_engine.config import get_config, load_model_configs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=128)
    ap.add_argument("--new-tokens", dest="new_tokens", type=int, default=64)
    args = ap.parse_args(argv)

    cfg = get_config(load_model_configs(args.config), args.model)
    path = artifact_dir(args.artifacts, cfg.name, args.precision)
    spec = {"engine": "tta", "path": str(path), "precision": args.precision}
    a, b = bench.make_lm_engine({**spec, "key": "a"}), bench.make_lm_engine({**spec, "key": "b"})
    a.load()
    b.load()
    try:
        ids = bench.chat_prompt_ids(a.lm.tokenizer, args.prompt_tokens)
        samples = bench.measure_decode([a, b], ids, args.new_tokens, reps=args.reps, warmup_tokens=4,
                                       pause_s=0.05, log=print)
    finally:
        a.close()
        b.close()

    def metrics(key):
        return {"decode_tok_s": [s.decode_tok_s for s in samples[key]], "ttft_s": [s.ttft_s for s in samples[key]]}

    rows = [("decode tok/s a ÷ b", bench.ratio(metrics("a")["decode_tok_s"], metrics("b")["decode_tok_s"])),
            ("TTFT a ÷ b", bench.ratio(metrics("a")["ttft_s"], metrics("b")["ttft_s"])),
            ("decode tok/s, interleaved halves",
             bench.ratio(*bench.interleaved_halves([s.decode_tok_s for s in samples["a"] + samples["b"]])))]
    bad = 0
    print(f"\n{cfg.name} {args.precision} against itself, {args.reps} reps each:")
    for name, value in rows:
        ok = value is not None and 0.5 <= value <= 2.0
        bad += not ok
        print(f"  {name:34} {value:6.3f}  {'ok' if ok else 'OUTSIDE [0.5, 2]'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
