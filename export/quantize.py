"""Stage 4: weight quantization with ONNX Runtime's quantizers.

- int8: dynamic, per-channel (MatMulInteger with uint8 weights, see ``quantize_int8``), the LM head and
  the embedding Gather included; activations quantized per token (``per_token_activations``).
- int8 encoders (``quantize_encoder_int8``): weight-only 8-bit blocks (MatMulNBits, accuracy level 4:
  int8 activations per block of 32), closer to fp32 than per-channel MatMulInteger and faster on
  VNNI CPUs.
- int4: weight-only blockwise (MatMulNBits, configurable block size) for every layer MatMul; weights
  already on a block grid (GGUF sources) are re-encoded exactly at 4 or 8 bits (grid.py). The LM head
  and the embedding table (GatherBlockQuantized) are quantized too, at 8 bits by default: on small
  models with large vocabularies they dominate both the bytes read per token and the error. A tied
  table is stored once: the lookup reads the head's quantized weight.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import onnx

from .onnx_io import drop_unused_initializers, save_onnx

log = logging.getLogger(__name__)


def untie_lm_head(model: onnx.ModelProto, base_dir: str = "") -> int:
    """Give every MatMul fed by ``Transpose(initializer)`` (a tied LM head) its own transposed weight.

    Quantizers only touch MatMuls whose B is a constant initializer; Optimum's export of a tied head
    reads the embedding table through a Transpose, which would leave the largest matrix in fp32.
    Returns the number of MatMuls rewritten.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        prod = producers.get(node.input[1])
        if prod is None or prod.op_type != "Transpose" or prod.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            continue
        weight = numpy_helper.to_array(inits[prod.input[0]], base_dir).T.copy()
        name = f"{prod.input[0]}.untied_T"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        node.input[1] = name
        rewritten += 1
    if rewritten:
        used = {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
        del graph.node[:]
        graph.node.extend(keep)
    return rewritten


def _load_untied(src: Path, external: bool = True) -> onnx.ModelProto:
    """The graph at ``src`` with its LM head untied. ``external=False`` leaves weights stored in a .data
    file there (read one at a time by ``base_dir`` callers: a model whose fp32 weights fill the memory)."""
    model = onnx.load(str(src), load_external_data=external)
    untie_lm_head(model, str(src.parent))
    return model


def quantize_int8(src: Path, dst: Path) -> None:
    """Weights as uint8 (asymmetric per channel), activations uint8 per token: ORT's uint8 x int8 kernel on
    x86 CPUs without VNNI (AVX2 only, e.g. AMD Zen 2/3) adds pairs of products in int16 with saturation
    (vpmaddubsw: 255 * 127 * 2 > 32767), which broke int8-weight graphs there (tiny Llama: top-1 0.63);
    7-bit weights (``reduce_range``) avoid it at a fidelity cost (SmolLM2 top-1 0.80). uint8 x uint8
    never saturates and keeps 8-bit weights, so one artifact computes well on every CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    untied = dst.with_name(dst.stem + ".untied.onnx")
    save_onnx(_load_untied(src), untied)
    try:
        quantize_dynamic(
            untied, dst, per_channel=True, weight_type=QuantType.QUInt8,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        untied.unlink(missing_ok=True)
    model = onnx.load(str(dst))
    per_token_activations(model)
    save_onnx(model, dst)


def per_token_activations(model: onnx.ModelProto) -> int:
    """Quantize each MatMulInteger's activations per token (row) instead of per tensor.

    ORT's dynamic quantization (DynamicQuantizeLinear) uses one scale for the whole [batch, seq, K]
    activation tensor, so a few tokens with very large activations (attention sinks, the first tokens)
    coarsen every other token's quantization -- and rows of a batch change each other's numerics.
    ORT's CPU MatMulInteger takes one activation zero point, so the per-row affine quantization is
    written with zero point 0 and the offset moved out of the integer product:

        lo, hi = min, max of x over K (per row);  s = (hi - lo) / 255;  q = round((x - lo) / s)  (uint8)
        x @ W  ~=  s * (q @ Wq) * w_scale  +  lo * colsum(W)          colsum(W) = w_scale * sum_k (Wq - w_zp)

    Measured on SmolLM2: int8 greedy replies that went off-task or repeated one sentence became fluent.
    Returns the number of activation quantizers rewritten."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n

    def reduce(op: str, x: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node(op, [x, "pt.axes"], [out], keepdims=1, name=out)
        return helper.make_node(op, [x], [out], keepdims=1, axes=[-1], name=out)

    consts = {"pt.eps": np.array(1e-10, np.float32), "pt.c255": np.array(255, np.float32),
              "pt.half": np.array(0.5, np.float32), "pt.z0": np.array(0, np.uint8)}
    if opset >= 18:  # ReduceMin/Max take their axes as an input
        consts["pt.axes"] = np.array([-1], np.int64)
    new_inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert in its place
    after: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert after it
    count = 0
    for n in graph.node:
        if n.op_type != "DynamicQuantizeLinear":
            continue
        x, (q, scale, zero) = n.input[0], n.output
        t = f"{q}.per_token."
        # q = trunc(x * inv + (0.5 - lo * inv)) = round((x - lo) / s): three passes over [..., K]
        before[n.name or q] = [
            reduce("ReduceMin", x, t + "lo"), reduce("ReduceMax", x, t + "hi"),
            helper.make_node("Sub", [t + "hi", t + "lo"], [t + "range"], name=t + "range"),
            helper.make_node("Max", [t + "range", "pt.eps"], [t + "range_eps"], name=t + "range_eps"),
            helper.make_node("Div", [t + "range_eps", "pt.c255"], [scale], name=t + "scale"),  # [..., 1]
            helper.make_node("Div", ["pt.c255", t + "range_eps"], [t + "inv"], name=t + "inv"),
            helper.make_node("Mul", [t + "lo", t + "inv"], [t + "lo_inv"], name=t + "lo_inv"),
            helper.make_node("Sub", ["pt.half", t + "lo_inv"], [t + "bias"], name=t + "bias"),
            helper.make_node("Mul", [x, t + "inv"], [t + "scaled"], name=t + "scaled"),
            helper.make_node("Add", [t + "scaled", t + "bias"], [t + "biased"], name=t + "biased"),
            helper.make_node("Cast", [t + "biased"], [q], to=TensorProto.UINT8, name=t + "q"),  # >= 0: trunc
        ]
        for c in consumers.get(zero, []):  # activation zero point 0: read the constant, no node per step
            for k, name in enumerate(c.input):
                if name == zero:
                    c.input[k] = "pt.z0"
        for mm in [c for c in consumers.get(q, []) if c.op_type == "MatMulInteger"]:
            cast = consumers[mm.output[0]][0]
            rescale = consumers[cast.output[0]][0]  # Mul(cast, scale * w_scale)
            scales = producer[next(i for i in rescale.input if i != cast.output[0])]
            w_scale = numpy_helper.to_array(inits[next(i for i in scales.input if i != scale)])
            wq = numpy_helper.to_array(inits[mm.input[1]]).astype(np.int64)
            wzp = numpy_helper.to_array(inits[mm.input[3]]).astype(np.int64) if len(mm.input) > 3 else 0
            colsum = (w_scale * (wq - wzp).sum(0)).astype(np.float32)  # [N]
            name = mm.output[0] + ".colsum"
            new_inits.append(numpy_helper.from_array(colsum, name))
            out = rescale.output[0]
            rescale.output[0] = out + ".no_offset"
            after[rescale.name or out] = [
                helper.make_node("Mul", [t + "lo", name], [out + ".offset"], name=out + ".offset"),
                helper.make_node("Add", [out + ".no_offset", out + ".offset"], [out], name=out + ".with_offset"),
            ]
        count += 1
    if count:
        nodes = []
        for n in graph.node:
            key = n.name or n.output[0]
            if n.op_type == "DynamicQuantizeLinear":
                nodes += before[key]
                continue
            nodes.append(n)
            nodes += after.get(n.name or n.output[0].removesuffix(".no_offset"), [])
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(new_inits)
    return count


def lm_head_node(model: onnx.ModelProto) -> str | None:
    """Name of the LM head MatMul (by name, else the last MatMul with a constant weight)."""
    inits = {i.name for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    named = [n.name for n in matmuls if "lm_head" in n.name]
    return named[0] if named else (matmuls[-1].name if matmuls else None)


def quantize_embedding_8bit(model: onnx.ModelProto, block_size: int = 32) -> list[str]:
    """Gather(table[vocab, hidden], ids) -> GatherBlockQuantized with uint8 blocks along hidden.

    ORT's quantizer offers GatherBlockQuantized at 4 bits only, which costs small models a lot of
    fidelity (SmolLM2 int4: KL 0.007 -> 0.028); a lookup reads one row per token, so 8 bits cost no speed.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done = []
    for idx, node in enumerate(graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[0] not in inits or axis != 0:
            continue
        table = numpy_helper.to_array(inits[node.input[0]])
        if table.ndim != 2 or table.dtype != np.float32 or table.shape[1] % block_size:
            continue
        vocab, hidden = table.shape
        blocks = table.reshape(vocab, hidden // block_size, block_size)
        lo, hi = blocks.min(-1), blocks.max(-1)
        scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
        q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
        base = node.input[0]
        graph.initializer.extend([numpy_helper.from_array(q.reshape(vocab, hidden), f"{base}.q8"),
                                  numpy_helper.from_array(scale, f"{base}.scales8"),
                                  numpy_helper.from_array(zero, f"{base}.zero8")])
        graph.node[idx].CopyFrom(helper.make_node(
            "GatherBlockQuantized", [f"{base}.q8", node.input[1], f"{base}.scales8", f"{base}.zero8"],
            list(node.output), name=node.name, domain="com.microsoft", bits=8, block_size=block_size,
            gather_axis=0, quantize_axis=1))
        done.append(node.name)
    if done:
        drop_unused_initializers(model.graph)
        _ensure_opset(model, "com.microsoft", 1)
    return done


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def _embedding_gather(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Gather that looks token ids up in a constant [vocab, hidden] table, if there is one."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and node.input[0] in inits and axis == 0 and len(inits[node.input[0]].dims) == 2:
            return node
    return None


def _is_tied(model: onnx.ModelProto, head: str | None, base_dir: str = "") -> bool:
    """True when the LM head's weight [hidden, vocab] is the embedding table [vocab, hidden] transposed."""
    import numpy as np
    from onnx import numpy_helper

    gather = _embedding_gather(model)
    node = next((n for n in model.graph.node if n.name == head), None)
    if gather is None or node is None:
        return False
    inits = {i.name: i for i in model.graph.initializer}
    if node.input[1] not in inits or list(inits[node.input[1]].dims) != list(inits[gather.input[0]].dims)[::-1]:
        return False
    return bool(np.array_equal(numpy_helper.to_array(inits[node.input[1]], base_dir).T,
                               numpy_helper.to_array(inits[gather.input[0]], base_dir)))


def share_tied_embedding(model: onnx.ModelProto, head_output: str) -> bool:
    """Make the embedding lookup read the 8-bit LM head's quantized weight: one copy of a tied table.

    MatMulNBits stores B as uint8 [vocab, hidden / block, block] at 8 bits, which is GatherBlockQuantized's
    layout with quantize_axis 2; its scales [vocab * blocks] (and zero points) are reshaped to
    [vocab, blocks, 1] by constant nodes and the looked-up rows back to [..., hidden]. Call only when the
    head and the table were equal (``_is_tied``); returns False (nothing changed) unless the head is an
    8-bit MatMulNBits without a correction term."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == head_output), None)
    gather = _embedding_gather(model)
    if head is None or gather is None:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    if attrs.get("bits") != 8 or len(head.input) > 4 or (len(head.input) == 4 and not head.input[3]):
        return False
    vocab, hidden, block = attrs["N"], attrs["K"], attrs["block_size"]
    prefix = "/model/embed_tokens/shared"
    shape3 = numpy_helper.from_array(np.array([vocab, hidden // block, 1], np.int64), f"{prefix}/blocks_shape")
    hidden_dim = numpy_helper.from_array(np.array([hidden], np.int64), f"{prefix}/hidden")
    graph.initializer.extend([shape3, hidden_dim])
    ids, out = gather.input[1], gather.output[0]
    nodes = [helper.make_node("Reshape", [head.input[2], shape3.name], [f"{prefix}/scales"], name=f"{prefix}/scales")]
    gbq_inputs = [head.input[1], ids, f"{prefix}/scales"]
    if len(head.input) == 4:
        nodes.append(helper.make_node("Reshape", [head.input[3], shape3.name], [f"{prefix}/zero_points"],
                                      name=f"{prefix}/zero_points"))
        gbq_inputs.append(f"{prefix}/zero_points")
    nodes += [
        helper.make_node("GatherBlockQuantized", gbq_inputs, [f"{prefix}/rows"], name=f"{prefix}/Gather",
                         domain="com.microsoft", bits=8, block_size=block, gather_axis=0, quantize_axis=2),
        helper.make_node("Shape", [ids], [f"{prefix}/ids_shape"], name=f"{prefix}/ids_shape"),
        helper.make_node("Concat", [f"{prefix}/ids_shape", hidden_dim.name], [f"{prefix}/out_shape"],
                         name=f"{prefix}/out_shape", axis=0),
        helper.make_node("Reshape", [f"{prefix}/rows", f"{prefix}/out_shape"], [out], name=f"{prefix}/Reshape"),
    ]
    index = list(graph.node).index(gather)
    del graph.node[index]
    for k, nd in enumerate(nodes):
        graph.node.insert(index + k, nd)
    drop_unused_initializers(model.graph)
    _ensure_opset(model, "com.microsoft", 1)
    return True


def _activation_rank(model: onnx.ModelProto) -> int | None:
    """3 for a graph fed ``input_ids`` [batch, seq] (its hidden states are [batch, seq, hidden], the layout
    of every decoder and encoder the exporters write); None when the graph does not say."""
    ids = next((i for i in model.graph.input if i.name == "input_ids"), None)
    if ids is None or not ids.type.tensor_type.HasField("shape"):
        return None
    return 3 if len(ids.type.tensor_type.shape.dim) == 2 else None


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int = 4,
                  head_bits: int = 8) -> dict:
    """Weight-only int4 for the layers; LM head and embedding at ``head_bits`` (8 by default).

    Weights already on a block grid (GGUF sources: Q4_0 ... Q8_0 and the K-quants, the head included) are
    re-encoded exactly at 4 or 8 bits (export/grid.py); the others are quantized round-to-nearest,
    symmetric, blockwise by ORT. A tied embedding reads the head's 8-bit weight (one copy on disk).
    Returns what was done, for the manifest.
    """
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from .grid import encode_grid_weights

    # weights in a .data file stay there until the grid pass has replaced the matrices it can (one read
    # each); the rest is loaded after: a model whose fp32 weights fill the memory is never held whole
    base = str(src.parent)
    model = _load_untied(src, external=False)
    head = lm_head_node(model)
    head_output = next((n.output[0] for n in model.graph.node if n.name == head), None)
    tied = _is_tied(model, head, base)
    grid = encode_grid_weights(model, accuracy_level=accuracy_level, base_dir=base,
                               activation_rank=_activation_rank(model))
    load_external_data_for_model(model, base)
    head_on_grid = head in grid.encoded
    rtn = MatMulNBitsQuantizer(
        model, nodes_to_exclude=grid.correction_nodes + ([head] if head else []),
        algo_config=DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",)))
    rtn.process()
    model = rtn.model.model
    if head and not head_on_grid:
        head_q = MatMulNBitsQuantizer(
            model, nodes_to_include=[head], nodes_to_exclude=grid.correction_nodes,
            algo_config=DefaultWeightOnlyQuantConfig(
                block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, bits=head_bits,
                op_types_to_quantize=("MatMul",)))
        head_q.process()
        model = head_q.model.model
    shared = tied and share_tied_embedding(model, head_output)
    gathers = [] if shared else quantize_embedding_8bit(model, block_size)
    save_onnx(model, dst)
    head_grid = grid.encoded.get(head)
    layers = {k: v for k, v in grid.encoded.items() if k != head}
    return {"method": "MatMulNBits weight-only", "bits": 4, "block_size": block_size,
            "accuracy_level": accuracy_level, "exact_grid_matrices": len(layers),
            "exact_grid_layouts": grid.summary(),
            "rtn_matrices": sum(1 for n in model.graph.node if n.op_type == "MatMulNBits") - len(grid.encoded)
            - (0 if head_on_grid or not head else 1),
            "lm_head": {"node": head, "bits": head_grid.bits if head_grid else head_bits, "exact_grid": head_on_grid},
            "embedding_bits": 8 if (gathers or shared) else None, "tied_embedding_shared": shared}


class _ThreadQuiet(logging.Filter):
    """Drops records below ERROR logged by one thread (the quantizing one); other threads log as usual."""

    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or record.levelno >= logging.ERROR


def quantize_encoder_int8(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int = 4) -> dict:
    """Sentence encoders at int8: every MatMul as an 8-bit MatMulNBits (symmetric, blockwise), the
    activations quantized to int8 per block of ``block_size`` by the kernel (accuracy level 4).

    Measured on all-minilm-l6-v2 (2-core AVX-512 VNNI): min cosine to fp32 0.9998 on 256 game texts,
    where per-channel MatMulInteger (``quantize_int8``, the decoders' int8) gave 0.9987 on the export's
    validation texts, and 1.05x its sentences/s. A fused ``Attention`` node keeps its fp32 QKV weights
    and ``EmbedLayerNormalization`` its table (neither is a MatMul)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=8,
        op_types_to_quantize=("MatMul",)))
    q.process()
    model = q.model.model
    save_onnx(model, dst)
    return {"method": "MatMulNBits weight-only", "bits": 8, "block_size": block_size,
            "accuracy_level": accuracy_level, "activations": "int8 per block (kernel)",
            "matrices": sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")}


def quantize(src: Path, dst: Path, precision: str, *, block_size: int = 32, kind: str = "causal_lm") -> dict:
    # ORT's quantizers log every node at INFO (on the root logger and their own); keep export readable
    # without touching any logger's level: a filter drops this thread's records below ERROR.
    quiet = _ThreadQuiet(threading.get_ident())
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime.quantization.matmul_nbits_quantizer")]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        if kind == "embedding" and precision == "int8":
            return quantize_encoder_int8(src, dst, block_size=block_size)
        return _quantize(src, dst, precision, block_size)
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


def _quantize(src: Path, dst: Path, precision: str, block_size: int) -> dict:
    if precision == "int8":
        quantize_int8(src, dst)
        return {"method": "dynamic per-channel (MatMulInteger)", "bits": 8, "weights": "uint8 per channel",
                "activations": "uint8 per token",
                "lm_head": True, "embedding": "uint8 Gather + DequantizeLinear"}
    if precision == "int4":
        return quantize_int4(src, dst, block_size=block_size)
    if precision == "fp16":
        from .fp16 import convert_fp16

        return convert_fp16(src, dst)
    raise ValueError(f"no quantization for precision {precision!r}")
