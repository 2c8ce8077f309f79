"""Export the artifacts that the runtime-only venv of ``.ci/run`` tests, and pack them.

Run with the full venv (torch, transformers):  python tests/export_fixtures.py OUT [--defaults]
Writes ``OUT/*.tar.gz``: the tiny test models (the layout the ``artifacts`` fixture reads, graph ``auto``)
and, with ``--defaults``, the two packaged default models at their configured precisions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ArtifactCache, tiny_cfg  # noqa: E402
from tiny_models import DECODER_ARCHS, save_tiny_decoder, save_tiny_encoder  # noqa: E402
from tta_engine.config import load_model_configs  # noqa: E402
from tta_engine.export.pipeline import ExportOptions, export_model  # noqa: E402
from tta_engine.pack import pack_artifacts  # noqa: E402

TINY = [(f"tiny-{a}", "fp32") for a in DECODER_ARCHS] + [("tiny-llama", "int4"), ("tiny-bert", "fp32")]
DEFAULTS = ("smollm2-135m-instruct", "all-minilm-l6-v2")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--defaults", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        cfgs = {f"tiny-{a}": tiny_cfg(f"tiny-{a}", save_tiny_decoder(a, tmp / a)) for a in DECODER_ARCHS}
        cfgs["tiny-bert"] = tiny_cfg("tiny-bert", save_tiny_encoder(tmp / "bert"), "embedding")
        cache = ArtifactCache(tmp / "artifacts", cfgs)
        for name, precision in TINY:
            cache.get(name, precision)
        for name in dict.fromkeys(n for n, _ in TINY):
            pack_artifacts(tmp / "artifacts" / "auto", name, None, args.out / f"{name}.tar.gz")
        if args.defaults:
            configs = load_model_configs()
            for name in DEFAULTS:
                cfg = configs[name]
                export_model(cfg, ExportOptions(precision=cfg.precision, out_root=tmp / "defaults"), quiet=True)
                pack_artifacts(tmp / "defaults", name, [cfg.precision], args.out / f"{name}.tar.gz")
    print("\n".join(sorted(p.name for p in args.out.glob("*.tar.gz"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
