"""Stage 4: weight quantization with ONNX Runtime's quantizers.

- int8: dynamic, per-channel (MatMulInteger with int8 weights), the LM head and the embedding Gather
  included.
- int4: weight-only blockwise (MatMulNBits, configurable block size) for every MatMul with a constant
  weight, the LM head included; the embedding table becomes GatherBlockQuantized when ORT supports it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

log = logging.getLogger(__name__)


def untie_lm_head(model: onnx.ModelProto) -> int:
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
        weight = numpy_helper.to_array(inits[prod.input[0]]).T.copy()
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


def _load_untied(src: Path) -> onnx.ModelProto:
    model = onnx.load(str(src))
    untie_lm_head(model)
    return model


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    untied = dst.with_name(dst.stem + ".untied.onnx")
    _save(_load_untied(src), untied)
    try:
        quantize_dynamic(
            untied, dst, per_channel=True, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        untied.unlink(missing_ok=True)


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int | None = 4) -> None:
    """Weight-only int4 (symmetric, blockwise). ``accuracy_level=4`` lets the CPU kernel compute in int8."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = _load_untied(src)
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quant = MatMulNBitsQuantizer(model, algo_config=cfg)
    quant.process()
    _save(quant.model.model, dst)


def _save(model: onnx.ModelProto, dst: Path) -> None:
    big = model.ByteSize() > 1_500_000_000 if hasattr(model, "ByteSize") else False
    if big:
        onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save_model(model, str(dst))


def quantize(src: Path, dst: Path, precision: str, *, block_size: int = 32) -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # ORT's quantizers log every node at INFO on the root logger
    try:
        _quantize(src, dst, precision, block_size)
    finally:
        root.setLevel(level)


def _quantize(src: Path, dst: Path, precision: str, block_size: int) -> None:
    if precision == "int8":
        quantize_int8(src, dst)
    elif precision == "int4":
        quantize_int4(src, dst, block_size=block_size)
    else:
        raise ValueError(f"no quantization for precision {precision!r}")
