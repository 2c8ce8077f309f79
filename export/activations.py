"""Two-digit int8 activations for 8-bit MatMulNBits: ``x @ W = a @ W + (x - a) @ W``.

At accuracy_level 4 ORT's MatMulNBits quantizes its input to int8 per block of ``block_size`` (step
``max|x| / 127``) and multiplies on integer units (VNNI). That rounding is the int4 artifacts' largest
error where activations have outliers: on Gemma 3 270M, whose GGUF stores 46 of 73 matrices (the fused
qkv and gate_up of every layer, half the down projections, the head) at 5-8 bits, int8 activations give
top-1 0.916 / KL 0.0031 against the fp32 model of the same weights, and fp32 activations (level 1) give
1.000 / 9e-12 -- at 1.5 tok/s, since ORT has no fast fp32 path for 8-bit weights.

This pass keeps the integer kernel and removes most of its rounding. Per block it computes ``a``, x
rounded onto the same int8 grid the kernel would use (so the kernel re-quantizes ``a`` exactly), and the
remainder ``b = x - a`` (``|b| <= step / 2``). Both go through the node as one input of twice the rows
(the weights are read once) and the two halves of the output are added: the kernel's rounding of ``b``
is ~1/254 of the rounding of ``x``, i.e. ~16-bit activations from two int8 digits. Measured on Gemma 3
270M (2-core EPYC, AVX-512 VNNI): top-1 0.958, KL 0.00069, decode 62 tok/s instead of 70, and prefill
costs twice on these matrices (the doubled rows are compute, not weight reads, at prompt lengths).

The export applies it only when int8 activations miss the int4 targets (pipeline.py, ``activations``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def eight_bit_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMulNBits nodes with 8-bit weights quantizing their input (accuracy_level 4)."""
    return [n.name for n in model.graph.node if n.op_type == "MatMulNBits"
            and _attrs(n).get("bits") == 8 and _attrs(n).get("accuracy_level", 0) == 4]


def split_activations(model: onnx.ModelProto, nodes: list[str] | None = None) -> int:
    """Rewrite ``nodes`` (default: every 8-bit MatMulNBits at accuracy_level 4) to two-digit activations,
    in place. Consumers of the same input share one split. Returns the number of nodes rewritten."""
    graph = model.graph
    wanted = set(eight_bit_nodes(model) if nodes is None else nodes)
    consts: set[str] = set()

    def const(name: str, value: np.ndarray) -> str:
        if name not in consts:
            graph.initializer.append(numpy_helper.from_array(value, name))
            consts.add(name)
        return name

    splits: dict[tuple[str, int], str] = {}  # (input, block) -> the [a; b] tensor
    out: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.name not in wanted:
            out.append(node)
            continue
        block, x = _attrs(node)["block_size"], node.input[0]
        key = (x, block)
        if key not in splits:
            p = f"{x}/a16_{block}"
            blocks = const(f"a16/blocks_{block}", np.array([-1, block], np.int64))
            inv = const("a16/inv127", np.array(1.0 / 127.0, np.float32))
            tiny = const("a16/tiny", np.array(1e-30, np.float32))
            out += [
                helper.make_node("Shape", [x], [f"{p}/shape"], name=f"{p}/shape"),
                helper.make_node("Reshape", [x, blocks], [f"{p}/blk"], name=f"{p}/blk"),
                helper.make_node("Abs", [f"{p}/blk"], [f"{p}/abs"], name=f"{p}/abs"),
                helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], name=f"{p}/amax", axes=[-1], keepdims=1),
                helper.make_node("Mul", [f"{p}/amax", inv], [f"{p}/step0"], name=f"{p}/step0"),
                helper.make_node("Max", [f"{p}/step0", tiny], [f"{p}/step"], name=f"{p}/step"),  # all-zero block
                helper.make_node("Div", [f"{p}/blk", f"{p}/step"], [f"{p}/u"], name=f"{p}/u"),
                helper.make_node("Round", [f"{p}/u"], [f"{p}/q"], name=f"{p}/q"),
                helper.make_node("Mul", [f"{p}/q", f"{p}/step"], [f"{p}/qa"], name=f"{p}/qa"),
                helper.make_node("Reshape", [f"{p}/qa", f"{p}/shape"], [f"{p}/a"], name=f"{p}/a"),
                helper.make_node("Sub", [x, f"{p}/a"], [f"{p}/b"], name=f"{p}/b"),
                helper.make_node("Concat", [f"{p}/a", f"{p}/b"], [f"{p}/ab"], name=f"{p}/ab", axis=0),
            ]
            splits[key] = f"{p}/ab"
        y = node.output[0]
        rewritten = onnx.NodeProto()
        rewritten.CopyFrom(node)
        rewritten.input[0] = splits[key]
        rewritten.output[0] = f"{y}/a16_ab"
        out += [
            rewritten,
            helper.make_node("Split", [f"{y}/a16_ab"], [f"{y}/a16_a", f"{y}/a16_b"], name=f"{node.name}/a16_split",
                             axis=0, **({"num_outputs": 2} if _opset(model) >= 18 else {})),
            helper.make_node("Add", [f"{y}/a16_a", f"{y}/a16_b"], [y], name=f"{node.name}/a16_add"),
        ]
    rewritten_count = sum(1 for n in graph.node if n.name in wanted)
    del graph.node[:]
    graph.node.extend(out)
    return rewritten_count


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
