"""Build a fused ONNX decoder graph straight from a loaded Hugging Face causal LM.

Instead of tracing PyTorch (Optimum: ~7,400 nodes for SmolLM2-135M), the graph is written
block by block with ONNX Runtime contrib ops (domain ``com.microsoft``), the way
onnxruntime-genai's model builder does it:

* embedding            Gather on the [vocab, hidden] table (then Gemma's sqrt(hidden) scale)
* RMSNorm (+ residual) SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization; the
                       ``input_skip_bias_sum`` output carries the residual stream
* attention            one packed QKV MatMul -> GroupQueryAttention (rotary inside, KV cache
                       written in place) -> o_proj MatMul
* MLP                  one packed gate|up MatMul -> Split -> act(gate) * up -> down MatMul
* LM head              its own MatMul with its own [hidden, vocab] initializer, even when tied

Every projection is a plain MatMul whose B input is a constant [in, out] initializer, so that
``onnxruntime.quantization.matmul_nbits_quantizer`` can turn it into MatMulNBits later.

Graph IO (batch = B, new tokens = S, layer = i):
    input_ids                   int64   [B, S]
    seqlens_k                   int32   [B]      valid cache length of the row after this step - 1
    total_sequence_length       int32   []       max over rows of the valid length after this step
    past_key_values.{i}.key     float32 [B, kv_heads, past_seq, head_dim]   (same for .value)
    logits                      float32 [B, S, vocab]
    present.{i}.key             float32 [B, kv_heads, present_seq, head_dim] (same for .value)

Bind one [B, kv_heads, max_cache_len, head_dim] buffer per layer as both past and present
(IO binding, same pointer): GroupQueryAttention then writes the new K/V at each row's position
in place (its past/present shared-buffer mode, CPU included). Limits of GroupQueryAttention:
a step with S > 1 and a non-empty past (chunked prefill) needs B == 1; a batched step with
rows of different lengths is either a right-padded first prefill or a decode step (S == 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..errors import ExportError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "phi3", "gemma3_text")
OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1.5e9  # bytes of weights above which they go to a sibling .data file
_ACTIVATIONS = {  # HF activation name -> (op, domain, attributes)
    "silu": ("QuickGelu", "com.microsoft", {"alpha": 1.0}),  # x * sigmoid(1.0 * x) == SiLU
    "swish": ("QuickGelu", "com.microsoft", {"alpha": 1.0}),
    "gelu_pytorch_tanh": ("FastGelu", "com.microsoft", {}),  # tanh approximation
    "gelu_new": ("FastGelu", "com.microsoft", {}),
    "gelu": ("Gelu", "com.microsoft", {}),  # exact (erf)
}


class UnsupportedArchitectureError(ExportError):
    """The model's architecture (or one of its features) has no fused graph builder."""


# ----------------------------------------------------------------------------------------------
# What the builder needs to know about the model
# ----------------------------------------------------------------------------------------------


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _activation(config) -> str:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")


def _unsupported_reason(config) -> str | None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads and heads % kv_heads:
        return f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
    if _head_dim(config) % 16:
        return f"head_dim={_head_dim(config)}: GroupQueryAttention's rotary needs a multiple of 16"
    if _activation(config) not in _ACTIVATIONS:
        return f"activation {_activation(config)!r}"
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if "dynamic" in str(rope_type):
        return "dynamic NTK rope scaling (its frequencies depend on the current length)"
    return None


def fused_supported(config) -> bool:
    """True when `build_fused_decoder` can build a graph for a model with this config."""
    return _unsupported_reason(config) is None


@dataclass
class _Spec:
    model_type: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    activation: str
    scale: float  # attention scale applied to Q.K
    max_cache_len: int
    norm_offset: float = 0.0  # Gemma RMSNorm multiplies by (1 + weight)
    embed_scale: float | None = None
    qk_norm: bool = False
    attn_softcap: float = 0.0
    final_softcap: float | None = None
    windows: list = field(default_factory=list)  # per layer: sliding window (keys seen) or None
    rotary_dim: int = 0
    head_perm: np.ndarray | None = None  # permutation of q/k head dims for partial rotary (or None)
    last_logits: bool = False  # logits for the last position only (the runtime never needs more)


def _spec(model, max_cache_len: int | None) -> _Spec:
    config = model.config
    reason = _unsupported_reason(config)
    if reason:
        raise UnsupportedArchitectureError(f"no fused ONNX builder for {reason}; use the generic export")
    if max_cache_len is None:
        max_cache_len = min(int(config.max_position_embeddings), 4096)
    n = config.num_hidden_layers
    gemma = config.model_type == "gemma3_text"
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types:
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    else:
        windows = [window] * n
    attn0 = model.model.layers[0].self_attn
    spec = _Spec(
        model_type=config.model_type, num_layers=n, hidden=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=attn0.head_dim, vocab=config.vocab_size, eps=float(config.rms_norm_eps),
        activation=_activation(config), scale=float(attn0.scaling), max_cache_len=int(max_cache_len),
        norm_offset=1.0 if gemma else 0.0, qk_norm=hasattr(attn0, "q_norm"),
        # HF's Gemma3 attention reads config.attn_logit_softcapping but never applies it (4.57).
        attn_softcap=0.0,
        final_softcap=getattr(config, "final_logit_softcapping", None),
        windows=[w if w and w < max_cache_len else None for w in windows],
    )
    if gemma:  # Gemma3TextScaledWordEmbedding: sqrt(hidden) rounded to the embedding dtype
        emb = model.model.embed_tokens
        spec.embed_scale = float(emb.embed_scale.to(emb.weight.dtype))
    return spec


# ----------------------------------------------------------------------------------------------
# A minimal graph writer
# ----------------------------------------------------------------------------------------------


class _Graph:
    """Nodes plus initializers written straight into the ModelProto (one copy of each weight)."""

    def __init__(self, stream_to: Path | None = None):
        self.model = onnx.ModelProto()
        self.nodes: list[onnx.NodeProto] = []
        self.weight_bytes = 0
        self._consts: dict[tuple, str] = {}
        # weights written to this external-data file as they are made, so the ModelProto holds only their
        # offsets: a model whose fp32 weights fit in memory once (beside PyTorch's) is never held twice
        self._data = open(stream_to, "wb") if stream_to is not None else None  # noqa: SIM115 - closed in close()
        self._data_name = stream_to.name if stream_to is not None else None

    def close(self) -> None:
        if self._data is not None:
            self._data.close()

    def weight(self, name: str, array) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().to(torch.float32).cpu().numpy()
        array = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d scalars 0-d
        t = self.model.graph.initializer.add()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        self.weight_bytes += array.nbytes
        if self._data is None or array.nbytes < 1024:
            t.raw_data = array.tobytes()
            return name
        offset = self._data.tell()
        pad = -offset % 4096  # ONNX Runtime may map aligned external data
        self._data.write(b"\0" * pad)
        self._data.write(memoryview(array).cast("B"))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self._data_name), ("offset", str(offset + pad)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return name

    def ints(self, values) -> str:
        """An int64 1-D constant (shapes, split sizes), shared between nodes."""
        key = ("i64", tuple(values))
        if key not in self._consts:
            self._consts[key] = self.weight(f"/const/i64_{'_'.join(map(str, values))}".replace("-", "m"),
                                            np.array(values, np.int64))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1,
             domain: str = "", **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def one(self, op: str, inputs: list[str], name: str, **kw) -> str:
        return self.node(op, inputs, name, **kw)[0]


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _linear_t(module) -> torch.Tensor:
    """nn.Linear weight [out, in] -> MatMul B [in, out]."""
    return module.weight.detach().to(torch.float32).t()


def _bias(module, out_features: int) -> torch.Tensor:
    b = getattr(module, "bias", None)
    return torch.zeros(out_features) if b is None else b.detach().to(torch.float32)


def _qkv(attn, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed Q|K|V projection: weight [hidden, (N + 2 KV) * head_dim] and bias (or None)."""
    if hasattr(attn, "qkv_proj"):  # phi3: already packed in this order
        mods = [attn.qkv_proj]
    else:
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    w = torch.cat([_linear_t(m) for m in mods], dim=1)
    has_bias = any(getattr(m, "bias", None) is not None for m in mods)
    b = torch.cat([_bias(m, m.out_features) for m in mods]) if has_bias else None
    if spec.head_perm is not None:  # reorder head dims of Q and K (not V), see _rotary_layout
        nq, nk, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        perm = torch.as_tensor(spec.head_perm)
        heads = torch.arange(nq + nk)[:, None] * d
        cols = torch.cat([(heads + perm).reshape(-1), torch.arange((nq + nk) * d, w.shape[1])])
        w = w[:, cols]
        b = None if b is None else b[cols]
    return w, b


def _gate_up(mlp) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Packed gate|up projection: weight [hidden, 2 * inter], bias (or None), inter."""
    mods = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
    w = torch.cat([_linear_t(m) for m in mods], dim=1)
    has_bias = any(getattr(m, "bias", None) is not None for m in mods)
    b = torch.cat([_bias(m, m.out_features) for m in mods]) if has_bias else None
    return w, b, w.shape[1] // 2


def _gamma(norm, spec: _Spec) -> torch.Tensor:
    return norm.weight.detach().to(torch.float32) + spec.norm_offset


# ----------------------------------------------------------------------------------------------
# Rotary caches
# ----------------------------------------------------------------------------------------------


def _rotary_layout(rotary_dim: int, head_dim: int) -> tuple[int, np.ndarray | None]:
    """GroupQueryAttention wants cos_cache width (rotary_dim / 2) to be a multiple of 8.

    When it is not (e.g. Phi partial rotary 0.75 of a small head), the half is padded to the next
    multiple of 8 with identity pairs (cos = 1, sin = 0) built from non-rotated dims, and the head
    dims of Q and K are permuted so that pair (i, i + half) becomes (i, i + padded_half). The same
    permutation on Q and K leaves Q.K unchanged. Returns (padded_half, permutation or None).
    """
    half = rotary_dim // 2
    padded = -(-half // 8) * 8
    if padded == half:
        return half, None
    d = padded - half
    r = rotary_dim
    perm = np.concatenate([np.arange(0, half), np.arange(r, r + d), np.arange(half, r),
                           np.arange(r + d, r + 2 * d), np.arange(r + 2 * d, head_dim)])
    return padded, perm


def _rotary_tables(rotary_emb, positions: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, width] from the model's own rotary module (all HF rope scalings)."""
    pos = torch.arange(positions)[None]
    cos, sin = rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    cos_t = np.ones((positions, width), np.float32)
    sin_t = np.zeros((positions, width), np.float32)
    cos_t[:, :half] = cos[0, :, :half].float().numpy()
    sin_t[:, :half] = sin[0, :, :half].float().numpy()
    return cos_t, sin_t


ROTARY_PREFIX = "/rotary"  # node names of the computed rotary tables


def _computed_tables(g: _Graph, rotary_emb, cos: np.ndarray, sin: np.ndarray, tag: str) -> tuple[str, str] | None:
    """cos/sin as nodes, scale * cos(range(n) x inv_freq), when that reproduces the module's tables.

    Every input is a constant, so ONNX Runtime folds them into tables once, at session start: the
    file holds a few hundred bytes instead of n * width * 8 (67 MB for Gemma 3's two 32k tables).
    Returns None (store the tables) where the module's tables are not of that form.
    """
    inv = getattr(rotary_emb, "inv_freq", None)
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0))
    if inv is None:
        return None
    inv = inv.detach().to(torch.float32).cpu().numpy()
    n, width = cos.shape
    half = inv.shape[0]
    freqs = np.arange(n, dtype=np.float32)[:, None] * inv[None]
    if half > width or max(np.abs(np.cos(freqs) * np.float32(scale) - cos[:, :half]).max(),
                           np.abs(np.sin(freqs) * np.float32(scale) - sin[:, :half]).max()) > 1e-5:
        return None
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    rng = g.one("Range", [g.weight(f"/rotary{tag}/start", f32(0)), g.weight(f"/rotary{tag}/limit", f32(n)),
                          g.weight(f"/rotary{tag}/delta", f32(1))], f"/rotary{tag}/Range")
    col = g.one("Unsqueeze", [rng, g.ints([1])], f"/rotary{tag}/Unsqueeze")
    freq = g.one("Mul", [col, g.weight(f"/rotary{tag}/inv_freq", inv[None])], f"/rotary{tag}/Mul")
    out = []
    for op, pad in (("Cos", 1.0), ("Sin", 0.0)):
        t = g.one(op, [freq], f"/rotary{tag}/{op}")
        if scale != 1.0:
            t = g.one("Mul", [t, g.weight(f"/rotary{tag}/scale_{op}", f32(scale))], f"/rotary{tag}/{op}_scale")
        if width > half:  # identity pairs of the padded layout (see _rotary_layout)
            fill = g.one("Expand", [g.weight(f"/rotary{tag}/pad_{op}", f32(pad)), g.ints([n, width - half])],
                         f"/rotary{tag}/{op}_pad")
            t = g.one("Concat", [t, fill], f"/rotary{tag}/{op}_concat", axis=1)
        out.append(g.one("Identity", [t], f"/rotary{tag}/{op.lower()}_cache"))
    # typed for fp16 conversion (export/fp16.py keeps these nodes in fp32: positions up to 32k lose their
    # integer precision in float16), which casts at their boundary only where it knows the types
    for node in g.nodes:
        if node.name.startswith(ROTARY_PREFIX + tag + "/"):
            g.model.graph.value_info.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                            for o in node.output)
    return out[0], out[1]


def _rotary_caches(g: _Graph, rotary_emb, spec: _Spec, width: int, tag: str) -> tuple[str, str]:
    """cos/sin [max_cache_len, width]; for longrope, Where(total > original, long, short)."""
    n, config = spec.max_cache_len, rotary_emb.config
    orig = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
    cos, sin = _rotary_tables(rotary_emb, n, width)  # long factors if n > orig
    if getattr(rotary_emb, "rope_type", "default") != "longrope" or n <= orig:
        computed = _computed_tables(g, rotary_emb, cos, sin, tag)
        if computed is not None:
            return computed
    names = g.weight(f"cos_cache{tag}", cos), g.weight(f"sin_cache{tag}", sin)
    if getattr(rotary_emb, "rope_type", "default") != "longrope" or n <= orig:
        return names
    # HF longrope uses the short factors while the sequence fits the original context.
    cos_s, sin_s = _rotary_tables(rotary_emb, orig, width)
    cos[:orig], sin[:orig] = cos_s, sin_s
    short = g.weight(f"cos_cache{tag}_short", cos), g.weight(f"sin_cache{tag}_short", sin)
    orig_c = g.weight(f"/rotary{tag}/original_len", np.array(orig, np.int32))
    is_long = g.one("Greater", ["total_sequence_length", orig_c], f"/rotary{tag}/Greater")
    return tuple(g.one("Where", [is_long, lng, sht], f"/rotary{tag}/Where_{k}")
                 for k, (lng, sht) in enumerate(zip(names, short, strict=True)))


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


def _embedding(g: _Graph, model, spec: _Spec) -> str:
    """input_ids [B, S] -> hidden [B, S, D]; Gemma's scale as a Mul after the lookup (the same fp32
    product as scaling the table), so that a tied table stays equal to the LM head's weight and the
    int4 export can keep one copy of it."""
    table = model.model.embed_tokens.weight.detach().to(torch.float32)
    w = g.weight("model.embed_tokens.weight", table)
    x = g.one("Gather", [w, "input_ids"], "/model/embed_tokens/Gather")
    if spec.embed_scale is not None:
        scale = g.weight("/model/embed_tokens/scale", np.array(spec.embed_scale, np.float32))
        x = g.one("Mul", [x, scale], "/model/embed_tokens/Mul")
    return x


def _norm(g: _Graph, x: str, gamma: torch.Tensor, spec: _Spec, name: str) -> str:
    """RMSNorm over the last axis: [..., D] -> [..., D]."""
    w = g.weight(f"{name}.weight", gamma)
    return g.one("SimplifiedLayerNormalization", [x, w], f"/{name}/SimplifiedLayerNorm",
                 axis=-1, epsilon=spec.eps, stash_type=1)


def _skip_norm(g: _Graph, x: str, residual: str, gamma: torch.Tensor, spec: _Spec, name: str):
    """(x + residual) -> (RMSNorm(x + residual), x + residual), all [B, S, D]."""
    w = g.weight(f"{name}.weight", gamma)
    out = g.node("SkipSimplifiedLayerNormalization", [x, residual, w], f"/{name}/SkipSimplifiedLayerNorm",
                 outputs=4, domain="com.microsoft", epsilon=spec.eps)
    return out[0], out[3]


def _matmul(g: _Graph, x: str, w: torch.Tensor, b: torch.Tensor | None, name: str) -> str:
    """x [B, S, in] @ w [in, out] (+ b [out]) -> [B, S, out]."""
    y = g.one("MatMul", [x, g.weight(f"{name}.MatMul.weight", w)], f"/{name}/MatMul")
    if b is not None:
        y = g.one("Add", [y, g.weight(f"{name}.Add.bias", b)], f"/{name}/Add")
    return y


def _head_norm(g: _Graph, x: str, heads: int, gamma: torch.Tensor, spec: _Spec, name: str) -> str:
    """Per-head RMSNorm: [B, S, heads * H] -> [B, S, heads, H] -> norm -> [B, S, heads * H]."""
    if spec.head_perm is not None:
        gamma = gamma[torch.as_tensor(spec.head_perm)]
    x4 = g.one("Reshape", [x, g.ints([0, 0, heads, spec.head_dim])], f"/{name}/Reshape_in")
    y = _norm(g, x4, gamma, spec, name)
    return g.one("Reshape", [y, g.ints([0, 0, heads * spec.head_dim])], f"/{name}/Reshape_out")


def _attention(g: _Graph, i: int, attn, x: str, spec: _Spec, rope: tuple[str, str]) -> str:
    """x [B, S, D] -> o_proj(GQA(qkv(x))) [B, S, D]; writes present.{i}.key/value."""
    p = f"model/layers.{i}/attn"
    nq, nkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    w, b = _qkv(attn, spec)
    qkv = _matmul(g, x, w, b, f"{p}/qkv_proj")  # [B, S, (N + 2 KV) * H]
    if spec.qk_norm:  # Gemma3: RMSNorm of each q/k head before rotary
        q, k, v = g.node("Split", [qkv, g.ints([nq, nkv, nkv])], f"/{p}/qkv_split", outputs=3, axis=-1)
        q = _head_norm(g, q, spec.num_heads, _gamma(attn.q_norm, spec), spec, f"{p}/q_norm")
        k = _head_norm(g, k, spec.num_kv_heads, _gamma(attn.k_norm, spec), spec, f"{p}/k_norm")
    else:  # packed QKV straight into GQA
        q, k, v = qkv, "", ""
    window = spec.windows[i]
    out = g.node(
        "GroupQueryAttention",
        [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
         "total_sequence_length", rope[0], rope[1]],
        f"/{p}/GroupQueryAttention",
        outputs=[f"/{p}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft", num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
        scale=spec.scale, do_rotary=1, rotary_interleaved=0, softcap=spec.attn_softcap,
        # ORT attends to the last local_window_size keys (current one included), as HF does
        local_window_size=window if window else -1,
    )[0]  # [B, S, N * H]
    return _matmul(g, out, _linear_t(attn.o_proj), getattr(attn.o_proj, "bias", None), f"{p}/o_proj")


def _mlp(g: _Graph, i: int, mlp, x: str, spec: _Spec) -> str:
    """x [B, S, D] -> down(act(gate(x)) * up(x)) [B, S, D]."""
    p = f"model/layers.{i}/mlp"
    w, b, inter = _gate_up(mlp)
    gate_up = _matmul(g, x, w, b, f"{p}/gate_up_proj")  # [B, S, 2 I]
    gate, up = g.node("Split", [gate_up, g.ints([inter, inter])], f"/{p}/gate_up_split", outputs=2, axis=-1)
    op, domain, attrs = _ACTIVATIONS[spec.activation]
    act = g.one(op, [gate], f"/{p}/act/{op}", domain=domain, **attrs)
    h = g.one("Mul", [act, up], f"/{p}/Mul")  # [B, S, I]
    return _matmul(g, h, _linear_t(mlp.down_proj), getattr(mlp.down_proj, "bias", None), f"{p}/down_proj")


def _lm_head(g: _Graph, model, x: str, spec: _Spec) -> str:
    """hidden [B, S, D] -> logits [B, S, V] with its own [D, V] weight (untied copy if tied)."""
    head = model.get_output_embeddings()
    w = g.weight("lm_head.MatMul.weight", _linear_t(head).clone())
    if spec.last_logits:  # [B, S, D] -> [B, 1, D]: a long prefill then pays the LM head once, not S times
        consts = [g.weight(f"/lm_head/last/{n}", np.array([v], np.int64))
                  for n, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))]
        x = g.one("Slice", [x, *consts], "/lm_head/last/Slice")
    logits = g.one("MatMul", [x, w], "/lm_head/MatMul")
    if getattr(head, "bias", None) is not None:
        logits = g.one("Add", [logits, g.weight("lm_head.Add.bias", head.bias)], "/lm_head/Add")
    if spec.final_softcap:  # logits = tanh(logits / cap) * cap
        cap = g.weight("/lm_head/softcap", np.array(spec.final_softcap, np.float32))
        t = g.one("Tanh", [g.one("Div", [logits, cap], "/lm_head/softcap/Div")], "/lm_head/softcap/Tanh")
        logits = g.one("Mul", [t, cap], "/lm_head/softcap/Mul")
    g.nodes[-1].output[0] = "logits"  # the last node writes the graph output directly
    return "logits"


def _decoder(g: _Graph, model, spec: _Spec, ropes: list[tuple[str, str]]) -> None:
    """Pre-norm residual stream; (Skip)SimplifiedLayerNormalization fuses each residual add."""
    x = _embedding(g, model, spec)
    residual = None  # running residual stream [B, S, D]
    pending = None  # block output still to be added to the residual
    gemma = spec.model_type == "gemma3_text"

    def add_and_norm(norm, name):
        nonlocal residual
        if residual is None:
            residual = x
            return _norm(g, x, _gamma(norm, spec), spec, name)
        y, residual = _skip_norm(g, pending, residual, _gamma(norm, spec), spec, name)
        return y

    for i, layer in enumerate(model.model.layers):
        p = f"model/layers.{i}"
        h = add_and_norm(layer.input_layernorm, f"{p}/input_layernorm")
        pending = _attention(g, i, layer.self_attn, h, spec, ropes[i])
        if gemma:  # Gemma: post_attention_layernorm on the block output, pre_feedforward before the MLP
            pending = _norm(g, pending, _gamma(layer.post_attention_layernorm, spec), spec,
                            f"{p}/post_attention_layernorm")
            h = add_and_norm(layer.pre_feedforward_layernorm, f"{p}/pre_feedforward_layernorm")
        else:
            h = add_and_norm(layer.post_attention_layernorm, f"{p}/post_attention_layernorm")
        pending = _mlp(g, i, layer.mlp, h, spec)
        if gemma:
            pending = _norm(g, pending, _gamma(layer.post_feedforward_layernorm, spec), spec,
                            f"{p}/post_feedforward_layernorm")
    h = add_and_norm(model.model.norm, "model/norm")
    _lm_head(g, model, h, spec)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _io(spec: _Spec) -> tuple[list, list, dict]:
    f32, kvh, hd = TensorProto.FLOAT, spec.num_kv_heads, spec.head_dim
    inputs = [
        ("input_ids", TensorProto.INT64, ["batch", "seq"]),
        ("seqlens_k", TensorProto.INT32, ["batch"]),
        ("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [("logits", f32, ["batch", 1 if spec.last_logits else "seq", spec.vocab])]
    for i in range(spec.num_layers):
        inputs += [(f"past_key_values.{i}.{kv}", f32, ["batch", kvh, "past_seq", hd]) for kv in ("key", "value")]
        outputs += [(f"present.{i}.{kv}", f32, ["batch", kvh, "present_seq", hd]) for kv in ("key", "value")]
    dtype = {TensorProto.INT64: "int64", TensorProto.INT32: "int32", f32: "float32"}
    desc = {
        "inputs": {n: {"dtype": dtype[t], "shape": s} for n, t, s in inputs},
        "outputs": {n: {"dtype": dtype[t], "shape": s} for n, t, s in outputs},
        "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
        "present_key": "present.{i}.key", "present_value": "present.{i}.value",
        "kv_layout": "batch, kv_heads, seq, head_dim",
        "past_present_share_buffer": True,
    }
    vi = helper.make_tensor_value_info
    return [vi(*x) for x in inputs], [vi(*x) for x in outputs], desc


def fp32_weight_bytes(model) -> int:
    """Bytes of the fused graph's fp32 weights: the model's parameters, the LM head counted again (it is
    its own initializer even when tied)."""
    return 4 * (sum(p.numel() for p in model.parameters()) + model.get_output_embeddings().weight.numel())


@torch.no_grad()
def build_fused_decoder(model, out_path: Path, *, max_cache_len: int | None = None,
                        last_position_logits: bool = False, stream_weights: bool | None = None) -> dict:
    """Write the fused decoder of `model` (a HF causal LM in eval mode) to `out_path`.

    `max_cache_len` (default: max_position_embeddings capped at 4096) sizes the rotary caches:
    it is the longest valid cache length a step may reach. ``stream_weights`` (default: when the weights
    go to a .data file anyway) writes each weight to that file as it is made. Returns a JSON-serialisable
    description.
    """
    spec = _spec(model, max_cache_len)
    spec.last_logits = last_position_logits
    rotary_dim = int(model.model.rotary_emb(torch.zeros(1), torch.zeros(1, 1, dtype=torch.long))[0].shape[-1])
    width, spec.head_perm = _rotary_layout(rotary_dim, spec.head_dim)
    spec.rotary_dim = rotary_dim

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{out_path.name}.data"
    (out_path.parent / data_name).unlink(missing_ok=True)
    stream = fp32_weight_bytes(model) > EXTERNAL_DATA_THRESHOLD if stream_weights is None else stream_weights
    g = _Graph(out_path.parent / data_name if stream else None)
    rope_global = _rotary_caches(g, model.model.rotary_emb, spec, width, "")
    rope_local = rope_global
    if hasattr(model.model, "rotary_emb_local"):  # Gemma3: sliding layers use rope_local_base_freq
        rope_local = _rotary_caches(g, model.model.rotary_emb_local, spec, width, "_local")
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * spec.num_layers
    ropes = [rope_local if t == "sliding_attention" else rope_global for t in layer_types]
    try:
        _decoder(g, model, spec, ropes)
    finally:
        g.close()

    inputs, outputs, io = _io(spec)
    onnx_model = g.model
    onnx_model.graph.name = "fused_decoder"
    onnx_model.graph.node.extend(g.nodes)
    onnx_model.graph.input.extend(inputs)
    onnx_model.graph.output.extend(outputs)
    onnx_model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    onnx_model.ir_version = 8
    onnx_model.producer_name = "tta_engine.export.fused"
    external = stream or g.weight_bytes > EXTERNAL_DATA_THRESHOLD
    if stream:  # the weights are in data_name already; the proto holds their offsets
        onnx.save_model(onnx_model, str(out_path))
    else:
        onnx.save_model(onnx_model, str(out_path), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    return {
        "format": "fused-gqa",
        "model_type": spec.model_type,
        "num_layers": spec.num_layers,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_size": spec.hidden,
        "vocab_size": spec.vocab,
        "max_cache_len": spec.max_cache_len,
        "rotary_dim": rotary_dim,
        # True: K is cached with its head dims permuted (partial rotary padding), V is not.
        "key_cache_permuted": spec.head_perm is not None,
        "sliding_windows": spec.windows,
        "num_nodes": len(g.nodes),
        "weight_bytes": g.weight_bytes,
        "external_data": data_name if external else None,
        "opset": OPSET,
        "last_position_logits": last_position_logits,
        "io": io,
    }


__all__ = ["SUPPORTED_MODEL_TYPES", "UnsupportedArchitectureError", "build_fused_decoder", "fused_supported"]
