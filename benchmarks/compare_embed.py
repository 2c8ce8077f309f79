"""Side-by-side sentence-embedding comparison (issue 3's embedding target), in one process.

sentences/s over a fixed corpus (batch 32) and single-query latency of tta-engine's fp32 and int8 encoder
artifacts vs sentence-transformers' ONNX backend (``SentenceTransformer(dir, backend="onnx")``, exported once
and cached under <out>/cache/; also its dynamic int8 export) and sentence-transformers on PyTorch, which is
the reference for the cosine check (targets: tta fp32 >= 1.5x the ONNX backend at cosine >= 0.9999; tta
int8 at cosine >= 0.999).

    .venv/bin/python benchmarks/compare_embed.py
    .venv/bin/python benchmarks/compare_embed.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench
from tta_engine.config import get_config, load_model_configs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--sentences", type=int, default=None)
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    ap.add_argument("--engine", dest="engines", action="append", default=None)
    ap.add_argument("--rss", choices=["subprocess", "delta", "off"], default="off")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    base = bench.BenchSettings.quick() if args.quick else bench.BenchSettings()
    settings = base.replace(emb_reps=args.reps, emb_sentences=args.sentences, emb_batch_size=args.batch_size,
                            rss=args.rss, threads=args.threads)
    cfg = get_config(load_model_configs(args.config), args.model)
    rec = bench.compare_embed(cfg, artifacts_root=args.artifacts, out_dir=args.out, settings=settings,
                              engines=args.engines)
    print(f"\n{cfg.name}: {settings.emb_sentences} sentences, batch {settings.emb_batch_size}, "
          f"{settings.emb_reps} reps (medians)")
    bench.print_embed_table(rec)
    bench.write_comparison(rec, settings, cfg.name, args.out, "compare_embed.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
