"""Two-digit int8 activations (export/activations.py): the rewritten 8-bit MatMulNBits is much closer to
the fp32 product of the same weights than ORT's one-digit int8 activations, on every input rank and
block size, and an all-zero block stays finite. Then the export's ``activations`` option end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

K, N = 128, 96


def _graph(block: int, rank: int, split: bool, level: int = 4):
    from tta_engine.export.activations import split_activations

    rng = np.random.default_rng(block)
    q = rng.integers(0, 256, (N, K // block, block), dtype=np.uint8)
    scales = (rng.random(N * K // block, dtype=np.float32) + 0.5) * 0.01
    dims = ["b", "s", K][-rank:] if rank > 1 else [K]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], N])
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], name="mm", domain="com.microsoft", K=K, N=N,
                            bits=8, block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(q, "q"),
                                                     numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    rewritten = split_activations(model) if split else 0
    onnx.checker.check_model(model)
    weights = (scales.reshape(N, -1, 1) * (q.astype(np.float32) - 128)).reshape(N, K).T  # [K, N]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), weights, rewritten


def _outlier_input(shape, seed=0):
    """Gaussian with a few channels 60x larger: the activations whose int8 rounding costs most."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., rng.choice(K, 4, replace=False)] *= 60
    return x


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("shape", [(3, K), (2, 5, K)])
def test_two_digit_activations_are_far_closer_to_fp32(block, shape):
    one, w, _ = _graph(block, len(shape), split=False)
    two, _, rewritten = _graph(block, len(shape), split=True)
    assert rewritten == 1
    x = _outlier_input(shape)
    exact = x.astype(np.float64) @ w
    err_one = np.abs(one.run(None, {"x": x})[0] - exact).max()
    got = two.run(None, {"x": x})[0]
    assert got.shape == exact.shape
    err_two = np.abs(got - exact).max()
    assert err_one > 1e-3 * np.abs(exact).max()  # one int8 digit visibly rounds these activations
    assert err_two < err_one / 30, (err_one, err_two)


def test_zero_rows_stay_finite_and_other_nodes_are_left_alone():
    two, w, _ = _graph(32, 2, split=True)
    x = _outlier_input((4, K))
    x[1] = 0
    got = two.run(None, {"x": x})[0]
    assert np.isfinite(got).all() and np.abs(got[1]).max() == 0
    # level 1 (fp32 activations) does not quantize its input: nothing to rewrite
    _, _, rewritten = _graph(32, 2, split=True, level=1)
    assert rewritten == 0


def test_consumers_of_one_input_share_one_split():
    from tta_engine.export.activations import split_activations

    rng = np.random.default_rng(1)
    inits, nodes = [], []
    for i in range(2):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (N, K // 32, 32), dtype=np.uint8), f"q{i}"),
                  numpy_helper.from_array(np.full(N * K // 32, 0.01, np.float32), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"], name=f"mm{i}",
                                      domain="com.microsoft", K=K, N=N, bits=8, block_size=32, accuracy_level=4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N]) for i in range(2)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    assert split_activations(model) == 2
    assert sum(n.op_type == "Concat" for n in model.graph.node) == 1


@pytest.mark.needs_torch
def test_export_tries_two_digits_only_when_int8_misses_the_targets(tiny_configs, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from tta_engine.export import gate
    from tta_engine.export.pipeline import ExportOptions, export_model

    cfg = tiny_configs["tiny-llama"]
    lines: list[str] = []
    met = export_model(cfg, ExportOptions(precision="int4", out_root=tmp_path / "met"), progress=lines.append)
    assert met.manifest["quantization"]["activations"] == {"mode": "int8", "matrices": 0}
    assert not any("two digits" in line for line in lines)

    # targets no graph can meet: the export re-encodes the 8-bit head, validates again, keeps the closer one
    monkeypatch.setitem(gate.TARGETS["causal_lm"], "int4", {"max_kl": -1.0})
    tried = export_model(cfg, ExportOptions(precision="int4", out_root=tmp_path / "tried"), progress=lines.append)
    acts = tried.manifest["quantization"]["activations"]
    fig = tried.manifest["validation"]["int4"]
    assert any("two digits" in line for line in lines)
    graph = onnx.load(str(tried.path / "model.onnx")).graph
    a16_nodes = sum(n.name.endswith("/a16_add") for n in graph.node)
    forced = export_model(cfg, ExportOptions(precision="int4", out_root=tmp_path / "forced", activations="int16"))
    two = forced.manifest["quantization"]["activations"]
    assert two["mode"] == "int16" and two["matrices"] >= 1, two  # the 8-bit LM head at least
    kl16 = forced.manifest["validation"]["int4"]["mean_kl_divergence"]
    if acts["mode"] == "int16":  # kept: it is the forced graph, closer than one digit
        assert a16_nodes == acts["matrices"] == two["matrices"]
        assert fig["mean_kl_divergence"] == kl16 <= acts["int8_figures"]["mean_kl_divergence"]
    else:  # one digit was closer on this model: kept, and the two-digit figures recorded
        assert a16_nodes == 0 and acts["int16_figures"]["mean_kl_divergence"] == kl16
        assert fig["mean_kl_divergence"] < kl16
