"""The export stage on tiny random models of every supported architecture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import DECODER_ARCHS, tiny_model
from tta_engine.artifact import VERIFIED_STAMP, load_artifact, sha256_file
from tta_engine.errors import ArtifactCorruptedError, ArtifactError
from tta_engine.export.validate import validation_prompts
from tta_engine.ort_decoder import OrtDecoder

PRECISIONS = ("fp32", "int8", "int4")


def torch_greedy(model, ids, steps):
    out = []
    with torch.no_grad():
        x = torch.tensor([ids])
        for _ in range(steps):
            nxt = int(model(x).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def ort_greedy(art, ids, steps):
    dec = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"])
    cache = dec.new_cache(1, 8)  # small on purpose: the cache must grow in place
    logits = dec.forward(cache, np.array([ids]))[0]
    out = []
    for _ in range(steps):
        nxt = int(logits.argmax())
        out.append(nxt)
        logits = dec.forward(cache, np.array([[nxt]]))[0]
    return out


@pytest.mark.parametrize("arch", DECODER_ARCHS)
@pytest.mark.parametrize("graph", ["auto", "optimum"])
def test_decoder_exports_at_every_precision(artifacts, arch, graph):
    for precision in PRECISIONS:
        art = artifacts.get(f"tiny-{arch}", precision, graph)
        m = art.manifest
        assert m["precision"] == precision and m["kind"] == "causal_lm"
        assert m["graph"] == ("fused" if graph == "auto" else "optimum"), m["validation"].get("fallback_reason")
        fig = m["validation"][precision]
        for key in ("max_abs_logit_diff", "top1_agreement", "mean_kl_divergence", "greedy_agreement"):
            assert key in fig
        assert m["validation"]["fp32"]["greedy_exact"] is True
        if precision == "fp32":
            assert fig["max_abs_logit_diff"] < 1e-3 and fig["top1_agreement"] == 1.0
        else:
            # random tiny models have flat logits, so top-1 is fragile; KL is the robust figure
            min_top1, max_kl = (0.85, 0.01) if precision == "int8" else (0.5, 0.05)
            assert fig["top1_agreement"] >= min_top1 and fig["mean_kl_divergence"] < max_kl, fig


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_fp32_greedy_tokens_equal_pytorch(artifacts, tiny_dirs, arch):
    from transformers import AutoTokenizer

    art = artifacts.get(f"tiny-{arch}", "fp32")
    model = tiny_model(arch)
    ids = validation_prompts(AutoTokenizer.from_pretrained(tiny_dirs[arch]))[1]
    assert ort_greedy(art, ids, 32) == torch_greedy(model, ids, 32)


def test_quantized_graphs_use_quantized_kernels_and_quantize_lm_head(artifacts):
    import onnx

    for precision, op in (("int4", "MatMulNBits"), ("int8", "MatMulInteger")):
        art = artifacts.get("tiny-llama", precision)  # tied embeddings: the LM head is the embedding table
        g = onnx.load(str(art.file("model.onnx"))).graph
        vocab = art.manifest["decoder"]["vocab_size"]
        hidden = 64
        # scales are small fp32 tensors; a full fp32 [vocab, hidden] table must not remain
        float_weights = [i.name for i in g.initializer
                         if i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) >= vocab * hidden // 4]
        assert not float_weights, f"{precision}: fp32 vocab-sized weights remain: {float_weights}"
        assert any(n.op_type == op for n in g.node)
        if precision == "int8":  # uint8 x uint8: ORT's AVX2 (non-VNNI) uint8 x int8 kernel saturates in int16
            from onnx import numpy_helper

            inits = {i.name: i for i in g.initializer}
            weights = [numpy_helper.to_array(inits[n.input[1]]) for n in g.node if n.op_type == "MatMulInteger"]
            assert weights and all(w.dtype == np.uint8 for w in weights)
            assert max(int(w.max()) - int(w.min()) for w in weights) > 200  # the full 8-bit range is used
        fp32 = artifacts.get("tiny-llama", "fp32")
        assert art.size_bytes < fp32.size_bytes


def test_fused_graph_is_much_smaller_than_optimum(artifacts):
    fused = artifacts.get("tiny-llama", "fp32", "auto").manifest["decoder"]["node_count"]
    unfused = artifacts.get("tiny-llama", "fp32", "optimum").manifest["decoder"]["node_count"]
    assert fused * 3 < unfused


def test_encoder_export_matches_sentence_transformers(artifacts):
    import onnx

    for precision in PRECISIONS:
        art = artifacts.get("tiny-bert", precision)
        fig = art.manifest["validation"][precision]
        assert fig["min_cosine"] >= {"fp32": 0.9999, "int8": 0.999, "int4": 0.98}[precision]
    # int8 encoders: 8-bit MatMulNBits blocks (closer to fp32 than per-channel MatMulInteger)
    int8 = artifacts.get("tiny-bert", "int8")
    ops = {n.op_type for n in onnx.load(str(int8.file("model.onnx"))).graph.node}
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops and "MatMul" not in ops
    assert int8.manifest["quantization"]["bits"] == 8
    assert artifacts.get("tiny-bert", "fp32").manifest["graph"] == "optimum+ort-fusions"


def test_manifest_lists_every_file_with_correct_sha256(artifacts):
    art = artifacts.get("tiny-qwen2", "int4")
    on_disk = {p.relative_to(art.path).as_posix() for p in art.path.rglob("*") if p.is_file()}
    # besides the manifest, only the runtime's stamp of a verified file state may be there (not exported)
    assert on_disk - {"manifest.json", VERIFIED_STAMP} == set(art.manifest["files"])
    for rel, meta in art.manifest["files"].items():
        assert sha256_file(art.file(rel)) == meta["sha256"]
        assert art.file(rel).stat().st_size == meta["size"]
    for key in ("source", "opset", "versions", "validation", "precision"):
        assert key in art.manifest
    assert art.manifest["source"]["input_hashes"]
    assert {"onnxruntime", "transformers", "optimum"} <= set(art.manifest["versions"])


def test_tampered_file_is_detected(artifacts, tmp_path):
    import shutil

    src = artifacts.get("tiny-llama", "fp32").path
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    load_artifact(copy)  # intact copy verifies
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptedError, match="sha256"):
        load_artifact(copy)
    shutil.copy2(src / "model.onnx", copy / "model.onnx")
    load_artifact(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactCorruptedError, match="missing"):
        load_artifact(copy)


def test_missing_artifact_error_says_how_to_export(tmp_path):
    with pytest.raises(ArtifactError, match="tta-engine export"):
        load_artifact(tmp_path / "ghost" / "int4")


def test_failed_export_leaves_old_artifact(artifacts, tiny_configs, tmp_path, monkeypatch):
    from tta_engine.export import pipeline

    root = tmp_path / "arts"
    cfg = tiny_configs["tiny-llama"]
    old = pipeline.export_model(cfg, pipeline.ExportOptions(out_root=root), quiet=True)
    before = {k: v["sha256"] for k, v in old.manifest["files"].items()}

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupt during the quantize stage

    monkeypatch.setattr(pipeline, "quantize", boom)
    # a different precision directory is untouched, and so is the same one:
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_model(cfg, pipeline.ExportOptions(out_root=root, precision="int4"), quiet=True)
    assert not (root / cfg.name / "int4").exists()
    monkeypatch.setattr(pipeline, "write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_model(cfg, pipeline.ExportOptions(out_root=root), quiet=True)
    again = load_artifact(root / cfg.name / "fp32")
    assert {k: v["sha256"] for k, v in again.manifest["files"].items()} == before
    # nothing staged is left: the only hidden entries are the published version and the export lock
    hidden = sorted(p.name for p in (root / cfg.name).iterdir() if p.name.startswith("."))
    assert hidden == sorted([os.readlink(root / cfg.name / "fp32"), ".export.lock"]), hidden


def test_export_killed_midway_leaves_old_artifact_loadable(tiny_configs, tiny_dirs, tmp_path):
    """SIGKILL a real `tta-engine export` subprocess at a random stage: the published artifact (link
    target and files) is unchanged, and the next export leaves no staged or work directory behind."""
    import random

    from tta_engine.export.pipeline import ExportOptions, export_model

    root = tmp_path / "arts"
    cfg_file = tmp_path / "models.toml"
    cfg_file.write_text(
        f'[models.tiny-phi3]\nmodel_type = "causal_lm"\ncontext_length = 256\nvalidation = {{ int4 = {{ min_top1 = 0.5 }} }}\n'
        f'source = {{ kind = "local", path = "{tiny_dirs["phi3"]}" }}\n'
    )
    export_model(tiny_configs["tiny-phi3"], ExportOptions(out_root=root, precision="int8"), quiet=True)
    link = root / "tiny-phi3" / "int8"
    target, before = os.readlink(link), json.loads((link / "manifest.json").read_text())["files"]
    stage = random.Random().randint(1, 5)  # load, export, optimize, quantize, validate
    cli = [sys.executable, "-m", "tta_engine.cli", "export", "tiny-phi3", "--config", str(cfg_file),
           "--out", str(root), "--precision", "int8"]
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # stage lines: "[k/6] tiny-phi3 (int8): ..."
        seen.append(line)
        if line.startswith(f"[{stage}/6]"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stderr.close()
    assert proc.wait(timeout=120) == -signal.SIGKILL, (stage, seen)  # killed, not finished
    assert os.readlink(link) == target
    art = load_artifact(link)
    assert art.manifest["files"] == before
    export_model(tiny_configs["tiny-phi3"], ExportOptions(out_root=root, precision="int8"), quiet=True)
    hidden = sorted(p.name for p in (root / "tiny-phi3").iterdir() if p.name.startswith("."))
    assert hidden == sorted([os.readlink(link), ".export.lock"]), (stage, hidden)


def test_cli_export_prints_validation(tiny_dirs, tmp_path):
    cfg_file = tmp_path / "models.toml"
    cfg_file.write_text(
        f'[models.tiny]\nmodel_type = "causal_lm"\ncontext_length = 256\nvalidation = {{ int4 = {{ min_top1 = 0.5 }} }}\n'
        f'source = {{ kind = "local", path = "{tiny_dirs["llama"]}" }}\n'
    )
    res = subprocess.run([sys.executable, "-m", "tta_engine.cli", "export", "tiny", "--config", str(cfg_file),
                          "--out", str(tmp_path / "a"), "--precision", "int4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "top1_agreement" in res.stdout and "[4/6]" in res.stderr
    bad = subprocess.run([sys.executable, "-m", "tta_engine.cli", "export", "nope", "--config", str(cfg_file)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr


def test_int4_artifact_prefills_with_its_int8_graph(artifacts):
    art = artifacts.get("tiny-llama", "int4")
    pre = art.manifest["decoder"]["prefill"]
    assert pre["precision"] == "int8" and pre["file"] in art.manifest["files"]
    dec = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"])
    calls = []
    for label, sess in (("prefill", dec.prefill_session), ("decode", dec.session)):
        real = sess.run_with_iobinding
        sess.run_with_iobinding = lambda io, *a, _r=real, _l=label: (calls.append(_l), _r(io, *a))[1]
    cache = dec.new_cache(1, 64)
    dec.forward(cache, np.arange(3, 3 + pre["min_tokens"])[None])
    dec.forward(cache, np.array([[5]]))
    dec.forward(cache, np.arange(3, 3 + pre["min_tokens"] - 1)[None])  # a short chunk stays on int4
    assert calls == ["prefill", "decode", "decode"]
    assert int(cache.lengths[0]) == 2 * pre["min_tokens"]
    assert artifacts.get("tiny-llama", "int8").manifest["decoder"].get("prefill") is None


def test_wide_decode_steps_run_on_the_prefill_graph(artifacts, tiny_configs):
    """The scheduler's throughput option: steps of >= wide_step_rows rows go to the int8 graph."""
    import threading

    from tta_engine.runtime import open_artifact_lm
    from tta_engine.sampling import SamplingParams
    from tta_engine.scheduler import END, BatchScheduler

    lm = open_artifact_lm(artifacts.get("tiny-llama", "int4"), tiny_configs["tiny-llama"])
    dec, sessions, shapes = lm.backend, [], []
    for label, sess in (("prefill", dec.prefill_session), ("decode", dec.session)):
        real = sess.run_with_iobinding
        sess.run_with_iobinding = lambda io, *a, _r=real, _l=label: (sessions.append(_l), _r(io, *a))[1]
    real_forward = dec._forward_fused
    dec._forward_fused = lambda cache, ids, *a: (shapes.append(ids.shape), real_forward(cache, ids, *a))[1]
    for rows, expect_wide in ((2, True), (0, False)):
        sessions.clear()
        shapes.clear()
        sched = BatchScheduler(lm, max_batch=4, wide_step_rows=rows)
        done = [threading.Event(), threading.Event()]
        params = SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=0.0)
        with sched.cond:  # admit both before the first step
            for i in range(2):
                sched.submit([5 + i, 6, 7, 8], params, lambda item, e=done[i]: item is END and e.set())
        assert all(e.wait(30) for e in done)
        sched.close()
        two_row_steps = {label for label, shape in zip(sessions, shapes, strict=True) if shape == (2, 1)}
        assert two_row_steps == ({"prefill"} if expect_wide else {"decode"})
    lm.close()


def test_per_token_activation_quantization_keeps_rows_independent(tmp_path):
    """int8 graphs for prefill quantize activations per row: an outlier token no longer coarsens the
    others, and a row's result does not depend on the other rows of the batch."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tta_engine.export.quantize import per_token_activations

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", 32])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    # uint8 weights, as export/quantize.py writes them (int8 weights saturate on AVX2 CPUs without VNNI)
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", per_channel=True, weight_type=QuantType.QUInt8)
    model = onnx.load(tmp_path / "q.onnx")
    assert per_token_activations(model) == 1
    onnx.save(model, tmp_path / "t.onnx")
    per_tensor = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    per_token = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])

    x = rng.standard_normal((1, 8, 64)).astype(np.float32)
    x[0, 0] *= 200.0  # an attention-sink-like token with huge activations
    exact = x @ w

    def err(sess):
        y = sess.run(None, {"x": x})[0]
        return np.abs(y - exact)[0, 1:].max() / np.abs(exact[0, 1:]).max()

    assert err(per_token) < 0.02 < err(per_tensor)
    x2 = x.copy()
    x2[0, 0] *= 3.0  # change one row: the others are bit-identical with per-token scales
    a, b = per_token.run(None, {"x": x})[0], per_token.run(None, {"x": x2})[0]
    np.testing.assert_array_equal(a[0, 1:], b[0, 1:])
    assert not np.array_equal(per_tensor.run(None, {"x": x})[0][0, 1:], per_tensor.run(None, {"x": x2})[0][0, 1:])


def test_prefill_graph_off_runs_prompts_on_the_decode_graph(artifacts, tiny_configs, tmp_path):
    """``prefill_graph = false`` (config): the int4 artifact's int8 prompt graph is not loaded (less
    memory); prompts run on the decode graph, and a request's text still does not depend on the cache."""
    import dataclasses

    from tta_engine.config import load_model_configs
    from tta_engine.runtime import open_artifact_lm

    art = artifacts.get("tiny-llama", "int4")
    cfg = dataclasses.replace(tiny_configs["tiny-llama"], prefill_graph=False)
    lm = open_artifact_lm(art, cfg)
    assert lm.backend.prefill_session is None
    calls = []
    real = lm.backend.session.run_with_iobinding
    lm.backend.session.run_with_iobinding = lambda io, *a: (calls.append("decode"), real(io, *a))[1]
    first = lm.generate("a long enough prompt for the prefill graph", temperature=0, max_new_tokens=8)
    assert calls and set(calls) == {"decode"}
    assert lm.generate("a long enough prompt for the prefill graph", temperature=0,
                       max_new_tokens=8)["token_ids"] == first["token_ids"]
    lm.close()
    default = open_artifact_lm(art, tiny_configs["tiny-llama"])
    assert default.backend.prefill_session is not None
    default.close()
    cfg_file = tmp_path / "models.toml"
    cfg_file.write_text('[models.m]\nmodel_type = "causal_lm"\nprefill_graph = false\n'
                        'source = {kind = "local", path = "x"}\n')
    assert load_model_configs(cfg_file)["m"].prefill_graph is False


def test_a_model_that_fills_the_memory_exports_the_same_artifact(tiny_configs, tmp_path, monkeypatch):
    """The low-memory path (weights streamed to disk, PyTorch released before the fp32 check, that check
    without prepacking) publishes the same graph: same figures, same greedy tokens."""
    from tta_engine.export import pipeline
    from tta_engine.export.pipeline import ExportOptions, export_model
    from tta_engine.runtime import open_artifact_lm

    cfg = tiny_configs["tiny-qwen2"]
    normal = export_model(cfg, ExportOptions(precision="int4", out_root=tmp_path / "normal"), quiet=True)
    monkeypatch.setattr(pipeline.DecoderExport, "_fills_memory", lambda self: True)
    lines: list[str] = []
    large = export_model(cfg, ExportOptions(precision="int4", out_root=tmp_path / "large"), progress=lines.append)
    assert any("weights streamed to disk" in line for line in lines)
    assert any("peak RSS" in line for line in lines)
    assert large.manifest["files"]["model.onnx"] == normal.manifest["files"]["model.onnx"]  # same bytes
    assert large.manifest["validation"]["int4"] == normal.manifest["validation"]["int4"]
    fp32 = large.manifest["validation"]["fp32"]  # checked without prepacking: other fp32 GEMM rounding
    assert fp32["greedy_exact"] is True and fp32["mean_kl_divergence"] < 1e-9
    outs = []
    for art in (normal, large):
        lm = open_artifact_lm(art)
        try:
            outs.append(lm.generate("The lantern", max_tokens=12, temperature=0.0)["text"])
        finally:
            lm.close()
    assert outs[0] == outs[1]
