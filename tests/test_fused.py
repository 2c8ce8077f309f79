"""The fused GroupQueryAttention decoder graph (export/fused.py) against PyTorch, on tiny models.

Every run uses ORT IO binding with ONE preallocated [batch, kv_heads, CACHE, head_dim] buffer per
layer and K/V, bound as both past and present, exactly as the runtime does.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import DECODER_ARCHS, VOCAB_SIZE, tiny_config, tiny_model
from tta_engine.export.fused import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    build_fused_decoder,
    fused_supported,
)

CACHE = 40  # cache buffer length of the tests (>= every sequence below)
TOL = 1e-4


class Fused:
    """A session over a built graph, plus its shared past/present buffers."""

    def __init__(self, path, info, batch: int = 1):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.info = info
        shape = (batch, info["num_kv_heads"], CACHE, info["head_dim"])
        self.kv = [np.zeros(shape, np.float32) for _ in range(2 * info["num_layers"])]

    def step(self, ids, seqlens_k, rows=None) -> np.ndarray:
        """ids [b, S]; seqlens_k [b] = valid length after the step - 1; rows: slice of the buffers."""
        ids = np.asarray(ids, np.int64)
        seqlens_k = np.asarray(seqlens_k, np.int32)
        logits = np.empty((*ids.shape, self.info["vocab_size"]), np.float32)
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", seqlens_k)
        io.bind_cpu_input("total_sequence_length", np.array(seqlens_k.max() + 1, np.int32))
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for i in range(self.info["num_layers"]):
            for j, kind in enumerate(("key", "value")):
                buf = self.kv[2 * i + j][rows if rows is not None else slice(None)]
                assert buf.flags.c_contiguous
                args = ("cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                io.bind_input(f"past_key_values.{i}.{kind}", *args)
                io.bind_output(f"present.{i}.{kind}", *args)
        self.sess.run_with_iobinding(io)
        return logits


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.atleast_2d(ids))).logits[0].float().numpy()


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _build(tmp_path_factory, model, name: str, **kw):
    path = tmp_path_factory.mktemp(name) / "decoder.onnx"
    info = build_fused_decoder(model, path, **kw)
    return path, info


@pytest.fixture(scope="module", params=DECODER_ARCHS)
def built(request, tmp_path_factory):
    model = tiny_model(request.param)
    path, info = _build(tmp_path_factory, model, request.param, max_cache_len=64)
    return request.param, model, path, info


def test_prefill_then_decode_in_place(built):
    _, model, path, info = built
    ids = _tokens(17, seed=1)
    ref = _torch_logits(model, ids)
    f = Fused(path, info)
    np.testing.assert_allclose(f.step([ids[:12]], [11])[0], ref[:12], atol=TOL, rtol=0)
    assert all(b[:, :, :12].any() and not b[:, :, 12:].any() for b in f.kv)  # written in place
    for pos in range(12, 17):  # 5 decode steps written into the same buffers
        out = f.step([[ids[pos]]], [pos])
        np.testing.assert_allclose(out[0, 0], ref[pos], atol=TOL, rtol=0)


def test_chunked_prefill_equals_single_prefill(built):
    _, model, path, info = built
    ids = _tokens(13, seed=2)
    whole, chunked = Fused(path, info), Fused(path, info)
    ref = whole.step([ids[:12]], [11])[0]
    a = chunked.step([ids[:7]], [6])[0]
    b = chunked.step([ids[7:12]], [11])[0]
    np.testing.assert_allclose(np.concatenate([a, b]), ref, atol=TOL, rtol=0)
    for x, y in zip(whole.kv, chunked.kv, strict=True):
        np.testing.assert_allclose(x[:, :, :12], y[:, :, :12], atol=TOL, rtol=0)
    out = chunked.step([[ids[12]]], [12])[0, 0]
    np.testing.assert_allclose(out, _torch_logits(model, ids)[12], atol=TOL, rtol=0)


def test_batch_rows_with_different_lengths(built):
    _, model, path, info = built
    a, b = _tokens(14, seed=3), _tokens(11, seed=4)  # prompts of 12 and 9, then 2 decode steps
    ref_a, ref_b = _torch_logits(model, a), _torch_logits(model, b)
    f = Fused(path, info, batch=2)
    out = f.step([a[:12], b[:9] + [0, 0, 0]], [11, 8])  # right-padded first prefill
    np.testing.assert_allclose(out[0], ref_a[:12], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1, :9], ref_b[:9], atol=TOL, rtol=0)
    for k in range(2):
        out = f.step([[a[12 + k]], [b[9 + k]]], [12 + k, 9 + k])
        np.testing.assert_allclose(out[0, 0], ref_a[12 + k], atol=TOL, rtol=0)
        np.testing.assert_allclose(out[1, 0], ref_b[9 + k], atol=TOL, rtol=0)


def test_graph_is_small_with_untied_lm_head(built):
    arch, model, path, info = built
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    n = model.config.num_hidden_layers
    assert info["num_nodes"] == len(ops) < n * 50
    assert ops.count("GroupQueryAttention") == n
    assert ops.count("MatMul") == 4 * n + 1  # packed qkv, o_proj, packed gate_up, down_proj; lm_head
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    d, v = model.config.hidden_size, model.config.vocab_size
    assert inits["lm_head.MatMul.weight"] == (d, v)
    assert inits["model.embed_tokens.weight"] == (v, d)
    assert model.config.tie_word_embeddings == (arch in ("llama", "phi3", "gemma3"))
    json.dumps(info)  # goes into the manifest


def _memorised(arch: str, ids: list[int], steps: int = 30):
    """A tiny model trained for a moment on `ids`, so that its next-token predictions are confident
    (a random tiny model's top-2 logits are closer than any 4-bit quantization error)."""
    model = tiny_model(arch).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.tensor([ids])
    for _ in range(steps):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_quantized_graph_keeps_top1(arch, tmp_path):
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    ids = _tokens(17, seed=5)
    model = _memorised(arch, ids[:16])
    info = build_fused_decoder(model, tmp_path / "decoder.onnx", max_cache_len=64)
    q = MatMulNBitsQuantizer(onnx.load(str(tmp_path / "decoder.onnx")), block_size=32, is_symmetric=True, bits=4)
    q.process()
    qpath = tmp_path / "decoder_q4.onnx"
    q.model.save_model_to_file(str(qpath), use_external_data_format=False)
    ops = [n.op_type for n in onnx.load(str(qpath)).graph.node]
    assert "MatMul" not in ops and ops.count("MatMulNBits") == 4 * model.config.num_hidden_layers + 1
    fp32 = Fused(tmp_path / "decoder.onnx", info).step([ids[:16]], [15])[0]
    q4 = Fused(qpath, info)
    assert (fp32.argmax(-1) == q4.step([ids[:16]], [15])[0].argmax(-1)).mean() >= 0.9
    assert np.isfinite(q4.step([[ids[16]]], [16])).all()  # and decodes in place


def test_gemma3_beyond_sliding_window_and_softcaps(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("gemma3")
    assert cfg.sliding_window == 8
    # HF's Gemma3 ignores attn_logit_softcapping (this fails if a transformers release starts using it)
    cfg.attn_logit_softcapping, cfg.final_logit_softcapping = 0.5, 3.0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    for m, tag in ((tiny_model("gemma3"), "gemma3"), (model, "gemma3_softcap")):
        path, info = _build(tmp_path_factory, m, tag, max_cache_len=64)
        assert info["sliding_windows"] == [8, None]
        ids = _tokens(30, seed=6)
        ref = _torch_logits(m, ids)
        f = Fused(path, info)
        np.testing.assert_allclose(f.step([ids[:11]], [10])[0], ref[:11], atol=TOL, rtol=0)
        np.testing.assert_allclose(f.step([ids[11:24]], [23])[0], ref[11:24], atol=TOL, rtol=0)
        for pos in range(24, 30):
            np.testing.assert_allclose(f.step([[ids[pos]]], [pos])[0, 0], ref[pos], atol=TOL, rtol=0)


def test_phi3_longrope_switches_with_total_length(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("phi3")
    half = int(cfg.hidden_size // cfg.num_attention_heads * cfg.partial_rotary_factor) // 2
    cfg.rope_scaling = {"type": "longrope", "short_factor": [1.0 + k / 10 for k in range(half)],
                        "long_factor": [2.0 + k for k in range(half)]}
    cfg.original_max_position_embeddings, cfg.max_position_embeddings = 16, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    path, info = _build(tmp_path_factory, model, "phi3_longrope")
    assert info["max_cache_len"] == 64 and info["key_cache_permuted"]
    for n in (12, 30):  # short factors up to 16 tokens, long factors beyond
        ids = _tokens(n, seed=n)
        out = Fused(path, info).step([ids], [n - 1])[0]
        np.testing.assert_allclose(out, _torch_logits(model, ids), atol=TOL, rtol=0)


def test_thirty_layers_is_a_few_hundred_nodes(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=30,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    info = build_fused_decoder(model, tmp_path / "d.onnx", max_cache_len=32)
    assert info["num_nodes"] <= 10 * 30 + 12  # per layer, plus embedding, head and the rotary tables (7)
    assert info["external_data"] is None and not (tmp_path / "d.onnx.data").exists()


def test_external_data_above_threshold(tmp_path, monkeypatch):
    import tta_engine.export.fused as fused

    monkeypatch.setattr(fused, "EXTERNAL_DATA_THRESHOLD", 0)
    model = tiny_model("llama")
    info = build_fused_decoder(model, tmp_path / "decoder.onnx", max_cache_len=64)
    assert info["external_data"] == "decoder.onnx.data"
    assert (tmp_path / "decoder.onnx.data").stat().st_size > (tmp_path / "decoder.onnx").stat().st_size
    ids = _tokens(5, seed=7)
    out = Fused(tmp_path / "decoder.onnx", info).step([ids], [4])[0]
    np.testing.assert_allclose(out, _torch_logits(model, ids), atol=TOL, rtol=0)


def test_streamed_weights_equal_the_saved_ones(tmp_path):
    """stream_weights=True writes each weight to the .data file as it is made (large models: never held
    twice); the graph computes the same logits as the one written by onnx's external-data save."""
    model = tiny_model("qwen2")
    ids = _tokens(6, seed=3)
    outs = []
    for stream in (True, False):
        d = tmp_path / str(stream)
        info = build_fused_decoder(model, d / "decoder.onnx", max_cache_len=64, stream_weights=stream)
        assert info["external_data"] == ("decoder.onnx.data" if stream else None)
        outs.append(Fused(d / "decoder.onnx", info).step([ids], [5])[0])
    assert (tmp_path / "True" / "decoder.onnx").stat().st_size < 100_000
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], _torch_logits(model, ids), atol=TOL, rtol=0)


def test_unsupported_architecture(tmp_path):
    assert SUPPORTED_MODEL_TYPES == ("llama", "qwen2", "phi3", "gemma3_text")
    bert = tiny_config("bert")
    assert not fused_supported(bert)
    assert all(fused_supported(tiny_config(a)) for a in DECODER_ARCHS)
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        build_fused_decoder(tiny_model("bert"), tmp_path / "x.onnx")
