"""CLI: ``tta-engine bench`` (found by engine/cli.py in a source checkout), ``python -m bench`` and its
``--probe`` mode (one engine's cold start and RSS, run in a fresh subprocess)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .memory import run_probe
from .report import print_decode_table, print_embed_table, print_targets
from .runner import run_bench
from .settings import DEFAULT_MODELS, BenchSettings


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark tta-engine against Optimum, PyTorch and others; "
                                            "writes results.md / results.json / plots")
    p.add_argument("--config", type=Path, default=None, help="model config TOML (default: packaged configs/models.toml)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifacts root (default: ./artifacts or $TTA_ENGINE_ARTIFACTS)")
    p.add_argument("--model", action="append", default=None,
                   help=f"repeatable; default: {' and '.join(DEFAULT_MODELS)}")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory (and cache/)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repetitions, in-process RSS deltas")
    p.add_argument("--engine", dest="engines", action="append", default=None,
                   help="only these engine keys (prefix match), e.g. tta-int4, optimum, torch-fp32; repeatable")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=None)
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=None)
    p.add_argument("--contexts", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="comma-separated prompt lengths for the context sweep (default 256,512,1024,2048)")
    p.add_argument("--streams", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="comma-separated concurrent stream counts (default 1,2,4,8,16)")
    p.add_argument("--rss", choices=["subprocess", "delta", "off"], default=None)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every engine (default: each engine's own)")
    from tta_engine.cli import add_device_option

    add_device_option(p)  # where tta-engine's own engines run (the baselines stay where they are)
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    base = BenchSettings.quick() if args.quick else BenchSettings()
    settings = base.replace(reps=args.reps, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                            context_lengths=args.contexts, streams=args.streams, rss=args.rss, threads=args.threads,
                            device=args.device)
    results = run_bench(args.model or DEFAULT_MODELS, args.out, args.quick, settings=settings,
                        artifacts_root=args.artifacts, config_path=args.config, engines=args.engines)
    for name, rec in results["models"].items():
        print(f"\n{name}:")
        (print_embed_table if rec["kind"] == "embedding" else print_decode_table)(rec)
        print_targets(rec["targets"])
    return 0


def _probe_main(argv: list[str]) -> int:
    kind, spec = argv[0], json.loads(argv[1])
    print(json.dumps(run_probe(spec, kind)), flush=True)
    return 0


def main(argv: list[str]) -> int:
    """``python -m bench [bench options]``, or ``--probe KIND SPEC_JSON`` in a subprocess."""
    if argv and argv[0] == "--probe":
        return _probe_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)
