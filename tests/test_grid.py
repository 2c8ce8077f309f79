"""Exact re-encoding of GGUF block grids (export/grid.py): every GGUF type's dequantized blocks are found
on a 4- or 8-bit MatMulNBits grid and the encoded graph computes x @ W like the fp32 MatMul."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from export.grid import detect_grid, encode_grid_weights  # noqa: E402

# byte offsets of each block's float16 scale fields (d, dmin/m), per ggml's block layouts
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
              Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# the layout each type lands on: bits / block (16-weight sub-blocks for Q2_K, Q3_K, Q6_K)
EXPECTED = {Q.Q4_0: (4, 32), Q.Q4_1: (4, 32), Q.Q4_K: (4, 32), Q.Q5_0: (8, 32), Q.Q5_1: (8, 32),
            Q.Q8_0: (8, 32), Q.Q5_K: (8, 32), Q.Q2_K: (4, 16), Q.Q3_K: (4, 16), Q.Q6_K: (8, 16)}


def gguf_matrix(qtype: Q, n: int = 24, k: int = 512, seed: int = 0) -> np.ndarray:
    """A [K, N] MatMul weight dequantized from random GGUF blocks of ``qtype`` (rows of N, blocks along K)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = rng.uniform(0.002, 0.02, len(raw)).astype(np.float16)[:, None].view(np.uint8)
    w = gguf_quants.dequantize(raw.reshape(n, -1), qtype)
    assert w.shape == (n, k)
    return np.ascontiguousarray(w.T.astype(np.float32))


@pytest.mark.parametrize("qtype", list(EXPECTED), ids=lambda t: t.name)
def test_every_gguf_type_is_found_exactly(qtype):
    w = gguf_matrix(qtype)
    grid = detect_grid(w)
    assert grid is not None, f"{qtype.name} blocks not recognised"
    assert (grid.bits, grid.block) == EXPECTED[qtype]
    np.testing.assert_allclose(grid.dequantize(), w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_symmetric_types_need_no_correction_term():
    for qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q6_K, Q.Q3_K):
        assert detect_grid(gguf_matrix(qtype)).residual is None, qtype.name
    assert detect_grid(gguf_matrix(Q.Q4_K)).residual is not None  # asymmetric mins: BlockSum(x) @ R


def test_off_grid_weights_are_left_alone():
    rng = np.random.default_rng(1)
    assert detect_grid(rng.standard_normal((512, 24)).astype(np.float32)) is None
    # one perturbed weight takes the whole matrix off the grid
    w = gguf_matrix(Q.Q8_0)
    w[5, 3] += 0.37 * np.abs(w).max() / 127
    assert detect_grid(w) is None


def _matmul_model(weights: dict[str, np.ndarray], rank: int = 2) -> onnx.ModelProto:
    k = next(iter(weights.values())).shape[0]
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}") for name in weights]
    outs = [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None) for name in weights]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * (rank - 1) + [k])],
                              outs, [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("rank", [2, 3], ids=["any-rank-indicator", "rank3-reducesum"])
def test_encoded_graph_computes_the_same_products(rank):
    weights = {t.name: gguf_matrix(t, seed=i) for i, t in enumerate(EXPECTED)}
    weights["dense"] = np.random.default_rng(2).standard_normal((512, 24)).astype(np.float32)
    model = _matmul_model(weights, rank)
    result = encode_grid_weights(model, accuracy_level=0, activation_rank=None if rank == 2 else rank)
    assert set(result.encoded) == {f"mm_{t.name}" for t in EXPECTED}
    assert sum(result.summary().values()) == len(EXPECTED)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == len(EXPECTED) and "MatMul" in ops  # 'dense' and the corrections
    corrected = sum(1 for g in result.encoded.values() if g.residual is not None)
    assert corrected and ops.count("ReduceSum") == (corrected if rank == 3 else 0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((2, 3, 512)[-rank:]).astype(np.float32)
    for name, y in zip(weights, sess.run(None, {"x": x}), strict=True):
        ref = x.astype(np.float64) @ weights[name]
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=name)


def _tied_model(table: np.ndarray) -> onnx.ModelProto:
    """Gather(table, ids) -> emb and a tied LM head MatMul(h, table^T) -> logits, as the fused builder writes."""
    vocab, hidden = table.shape
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="/model/embed_tokens/Gather"),
             helper.make_node("MatMul", ["h", "head_w"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, None, hidden])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.ascontiguousarray(table.T), "head_w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("on_grid", [True, False], ids=["q8_0-table", "float-table"])
def test_tied_embedding_is_stored_once(tmp_path, on_grid):
    from export.quantize import quantize_int4

    rng = np.random.default_rng(4)
    table = gguf_matrix(Q.Q8_0, n=96, k=64).T.copy() if on_grid else rng.standard_normal((96, 64)).astype(np.float32)
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(_tied_model(table), str(src))
    meta = quantize_int4(src, dst, accuracy_level=0)
    assert meta["tied_embedding_shared"] is True and meta["lm_head"]["exact_grid"] is on_grid
    model = onnx.load(str(dst))
    big = [i for i in model.graph.initializer if np.prod(i.dims) >= table.size]
    assert len(big) == 1, [i.name for i in big]  # one copy of the table
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 95], [7, 7, 1]], np.int64)
    h = rng.standard_normal((2, 3, 64)).astype(np.float32)
    emb, logits = sess.run(None, {"ids": ids, "h": h})
    assert emb.shape == (2, 3, 64) and logits.shape == (2, 3, 96)
    step = np.abs(table).max() / 127
    np.testing.assert_allclose(emb, table[ids], rtol=0, atol=1e-6 if on_grid else step)
    # the lookup and the head read the same numbers: the logits of the looked-up tokens are h . their rows
    rows = emb.reshape(-1, 64).astype(np.float64)  # the six looked-up tokens, in ids' order
    dense = np.einsum("bsh,vh->bsv", h.astype(np.float64), rows)
    np.testing.assert_allclose(logits[..., ids.reshape(-1)], dense, rtol=0, atol=1e-4 * np.abs(dense).max())


def test_gguf_header_is_parsed_once_within_a_load(tmp_path):
    """Transformers opens a GGUF for the config, the tokenizer and the weights; inside
    ``gguf_parsed_once`` they share one parse (the 262k-token header of Gemma 3 costs ~10 s per parse),
    and the real reader is back afterwards."""
    import gguf
    from tta_engine.sources import gguf_parsed_once

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"tok{i}" for i in range(64)])
    w.add_tensor("w", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    real = gguf.GGUFReader
    with gguf_parsed_once():
        a, b = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert a is b
        assert [bytes(a.fields["tokenizer.ggml.tokens"].parts[i]).decode()
                for i in a.fields["tokenizer.ggml.tokens"].data[:2]] == ["tok0", "tok1"]
        np.testing.assert_array_equal(np.asarray(a.tensors[0].data).reshape(4, 8),
                                      np.arange(32, dtype=np.float32).reshape(4, 8))
        with gguf_parsed_once():  # load_tokenizer / load_torch_causal_lm inside the export's block
            assert gguf.GGUFReader(path) is a
        assert gguf.GGUFReader(path) is a  # the outer block still shares
    assert gguf.GGUFReader is real and real(path) is not a
