"""The validation gate (export/gate.py): an export whose figures fail the thresholds publishes nothing
(and leaves what was published before untouched), unless --allow-low-fidelity, which marks it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tta_engine.errors import LowFidelityError

pytest.importorskip("torch")
pytestmark = pytest.mark.needs_torch
LM = "tiny-llama"


def _broken_quantize(real):
    """The real quantizer, then its int8 weights shuffled: a quantization that no longer is the model."""
    def quantize(src, dst, precision, **kw):
        import onnx
        from onnx import numpy_helper

        meta = real(src, dst, precision, **kw)
        model = onnx.load(str(dst))
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.dtype in (np.int8, np.uint8) and w.size >= 1024:
                init.CopyFrom(numpy_helper.from_array(rng.permutation(w.ravel()).reshape(w.shape), init.name))
        onnx.save(model, str(dst))
        return meta
    return quantize


def test_a_broken_quantization_publishes_nothing_and_keeps_what_was_there(tiny_configs, tmp_path, monkeypatch):
    from tta_engine.artifact import artifact_dir, load_artifact
    from tta_engine.export import pipeline
    from tta_engine.export.pipeline import ExportOptions, export_models

    cfg = tiny_configs[LM]
    good = export_models(cfg, ["int8"], ExportOptions(out_root=tmp_path), quiet=True)[0]
    before = {p.name: p.read_bytes() for p in good.path.iterdir() if p.is_file()}
    entries = sorted(p.name for p in good.path.parent.iterdir())
    monkeypatch.setattr(pipeline, "quantize", _broken_quantize(pipeline.quantize))
    lines: list[str] = []
    with pytest.raises(LowFidelityError) as err:
        export_models(cfg, ["int8", "fp16"], ExportOptions(out_root=tmp_path), progress=lines.append)
    msg = str(err.value)
    assert "int8: top1_agreement" in msg and "nothing was published" in msg and "--allow-low-fidelity" in msg
    assert err.value.failures["int8"]["thresholds"] == {"min_top1": 0.85, "max_kl": 0.10}
    # the earlier int8 artifact is byte for byte what it was; the fp16 of the same run was not written
    assert {p.name: p.read_bytes() for p in good.path.iterdir() if p.is_file()} == before
    load_artifact(good.path, rehash=True)
    assert not artifact_dir(tmp_path, LM, "fp16").exists()
    assert sorted(p.name for p in good.path.parent.iterdir()) == entries  # no staging left behind

    low = export_models(cfg, ["int8"], ExportOptions(out_root=tmp_path, allow_low_fidelity=True),
                        progress=lines.append)[0]
    marked = low.manifest["validation"]["low_fidelity"]
    assert "top1_agreement" in {f["figure"] for f in marked["failed"]} and marked["thresholds"]["min_top1"] == 0.85
    assert any("LOW-FIDELITY" in line for line in lines)


def test_the_cli_fails_with_the_figures_and_models_shows_a_low_fidelity_artifact(tiny_configs, tmp_path):
    """The CLI's exit status and messages, on a config whose thresholds no export can meet."""
    cfg = tiny_configs[LM]
    toml = tmp_path / "models.toml"
    toml.write_text(f'[models.strict]\nmodel_type = "causal_lm"\nsource = {{ kind = "local", path = "{cfg.source.path}" }}\n'
                    'context_length = 256\nprecision = "int8"\nvalidation = { int8 = { min_top1 = 1.01 } }\n')
    base = [sys.executable, "-m", "tta_engine.cli"]
    cfg_arg, arts = ["--config", str(toml)], str(tmp_path / "arts")
    out = [*cfg_arg, "--out", arts]
    res = subprocess.run([*base, "export", "strict", *out], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "top1_agreement" in res.stderr and "< 1.01" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "arts" / "strict" / "int8").exists()
    res = subprocess.run([*base, "export", "strict", *out, "--allow-low-fidelity"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "LOW FIDELITY" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([*base, "models", *cfg_arg, "--artifacts", arts], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "LOW FIDELITY" in res.stdout
