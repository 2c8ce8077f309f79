"""Shared fixtures: tiny random models saved to disk, their configs, and exported artifacts (cached per
session so each architecture/precision is exported once). Also puts tests/ on sys.path so that
``import tiny_models`` works.

Runtime-only mode: with ``TTA_TEST_ARTIFACTS=DIR`` (artifacts made by ``tests/export_fixtures.py`` in a
full venv and installed with ``tta-engine install-artifact``), the ``artifacts`` fixture reads them instead
of exporting, so the runtime, manager and embedding tests run in a venv without torch/transformers
(tests marked ``needs_torch`` are skipped there).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")  # the harness package ``bench``
for _p in (_TESTS, _BENCHMARKS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tiny_models import DECODER_ARCHS, save_tiny_decoder, save_tiny_encoder  # noqa: E402

PREBUILT = os.environ.get("TTA_TEST_ARTIFACTS")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_collection_modifyitems(config, items):
    if HAS_TORCH:
        return
    skip = pytest.mark.skip(reason="needs torch/transformers (runtime-only venv); runs in the full venv")
    for item in items:
        if "needs_torch" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_dirs(tiny_root) -> dict[str, Path]:
    if PREBUILT:  # artifacts exist already; the sources are never read
        return {arch: tiny_root / arch for arch in (*DECODER_ARCHS, "bert")}
    dirs = {arch: save_tiny_decoder(arch, tiny_root / arch) for arch in DECODER_ARCHS}
    dirs["bert"] = save_tiny_encoder(tiny_root / "bert")
    return dirs


def tiny_cfg(name: str, path: Path, model_type: str = "causal_lm", **extra):
    from tta_engine.config import model_config_from_dict

    # random tiny models have flat logits: their top-1 under int4 is fragile (KL is the robust figure), so
    # their int4 gate asks top-1 >= 0.5 instead of the real models' 0.90 (export/gate.py)
    raw = {"model_type": model_type, "source": {"kind": "local", "path": str(path)}, "max_tokens": 24,
           "temperature": 0.0, "context_length": 256, "validation": {"int4": {"min_top1": 0.5}}}
    if model_type == "embedding":
        raw = {"model_type": "embedding", "source": {"kind": "local", "path": str(path)}, "embedding_dimension": 64}
    raw.update(extra)
    return model_config_from_dict(name, raw)


@pytest.fixture(scope="session")
def tiny_configs(tiny_dirs):
    cfgs = {f"tiny-{a}": tiny_cfg(f"tiny-{a}", tiny_dirs[a]) for a in DECODER_ARCHS}
    cfgs["tiny-bert"] = tiny_cfg("tiny-bert", tiny_dirs["bert"], "embedding")
    return cfgs


class ArtifactCache:
    """Exports on first request and remembers the artifact (session-wide)."""

    def __init__(self, root: Path, configs):
        self.root, self.configs, self.done = root, configs, {}

    def get(self, name: str, precision: str = "fp32", graph: str = "auto"):
        key = (name, precision, graph)
        if key not in self.done and PREBUILT:
            from tta_engine.artifact import load_artifact

            path = self.root / graph / name / precision
            if not (path / "manifest.json").is_file():
                pytest.skip(f"{path} was not exported by tests/export_fixtures.py")
            self.done[key] = load_artifact(path)
        if key not in self.done:
            from tta_engine.export.pipeline import ExportOptions, export_model

            options = ExportOptions(precision=precision, out_root=self.root / graph, graph=graph)
            self.done[key] = export_model(self.configs[name], options, quiet=True)
        return self.done[key]


@pytest.fixture(scope="session")
def artifacts(tiny_root, tiny_configs) -> ArtifactCache:
    return ArtifactCache(Path(PREBUILT) if PREBUILT else tiny_root / "artifacts", tiny_configs)


@pytest.fixture(scope="module")
def shared_manager(artifacts, tiny_configs):
    """One manager over the tiny fp32 artifacts, shared by a test module (its tests must leave it serving)."""
    from tta_engine.manager import TransformersModelManager

    for name in ("tiny-llama", "tiny-qwen2"):
        artifacts.get(name, "fp32")
    artifacts.get("tiny-bert", "fp32")
    m = TransformersModelManager(tiny_configs, artifacts_root=artifacts.root / "auto")
    yield m
    m.close()


@pytest.fixture(scope="session")
def default_artifacts(tmp_path_factory):
    """The two packaged default models exported once per session (SmolLM2 int4 + int8, MiniLM fp32):
    (artifacts root, configs, {(name, precision): Artifact}). Shared by every end-to-end test module."""
    from tta_engine.config import load_model_configs
    from tta_engine.export.pipeline import ExportOptions, export_model, export_models

    lm, emb = "smollm2-135m-instruct", "all-minilm-l6-v2"
    root = tmp_path_factory.mktemp("real-artifacts")
    cfgs = load_model_configs()
    arts = {(lm, a.precision): a for a in export_models(cfgs[lm], ["int4", "int8"], ExportOptions(out_root=root))}
    arts[(emb, "fp32")] = export_model(cfgs[emb], ExportOptions(precision="fp32", out_root=root))
    return root, cfgs, arts


@pytest.fixture(scope="module")
def default_manager(default_artifacts):
    """A manager over the exported defaults, installed as the integrations' process-wide default manager
    (what the examples use), restored afterwards."""
    from tta_engine.integrations import common
    from tta_engine.manager import TransformersModelManager

    root, cfgs, _ = default_artifacts
    m = TransformersModelManager(cfgs, artifacts_root=root)
    previous = common._manager
    common.set_default_manager(m)
    yield m
    common.set_default_manager(previous)
    m.close()
