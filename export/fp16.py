"""fp16 precision: the fp32 graph's weights and activations converted to float16 (GPU artifacts).

Uses ONNX Runtime's own converter (``onnxruntime.transformers.float16``, shipped with onnxruntime): every
float initializer and float tensor becomes float16 -- the KV cache inputs/outputs included, so a
decoder's cache is half the bytes -- except the other outputs (logits, an encoder's hidden states), which
stay float32 (a Cast at the end) for sampling and pooling on the host. Ops in the converter's default block list stay float32 behind Casts.

The artifact must also run on the CPU (where the export validates it): when ONNX Runtime's CPU provider
has no float16 kernel for an op, the session fails to build; that op type is added to the block list
and the graph converted again, until the session builds. The op types kept in fp32 are recorded.
"""

from __future__ import annotations

import re
from pathlib import Path

_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")
MAX_RETRIES = 12


def convert_fp16(src: Path, dst: Path) -> dict:
    """Write the fp16 version of ``src`` to ``dst``; returns the manifest's quantization record."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    from .onnx_io import save_onnx

    blocked: list[str] = []
    for _ in range(MAX_RETRIES):
        model = _convert(onnx.load(str(src)), list(DEFAULT_OP_BLOCK_LIST) + blocked)
        save_onnx(model, dst)
        missing = _cpu_kernel_missing(dst)
        if missing is None:
            break
        if missing in blocked:
            raise RuntimeError(f"fp16 graph still lacks a CPU kernel for {missing} after keeping it in fp32")
        blocked.append(missing)
    else:
        raise RuntimeError(f"fp16 conversion kept {blocked} in fp32 and still does not run on the CPU")
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    kv = [t for n, t in inputs.items() if n.startswith("past_key_values.")]
    record = {"method": "fp16 (onnxruntime.transformers.float16)", "bits": 16, "outputs": "fp32",
              "fp32_ops_for_cpu": blocked}
    if kv:
        record["kv_cache"] = "fp16" if kv[0] == onnx.TensorProto.FLOAT16 else "fp32"
    return record


def _convert(model, op_block_list: list[str]):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from .fused import ROTARY_PREFIX

    keep = [o.name for o in model.graph.output if not o.name.startswith("present.")]  # logits, hidden states
    # the rotary tables computed in-graph (fused.py) stay fp32: float16 positions stop being exact past 2048
    rotary = [n.name for n in model.graph.node if n.name.startswith(ROTARY_PREFIX)]
    return convert_float_to_float16(model, keep_io_types=keep, op_block_list=op_block_list,
                                    node_block_list=rotary, disable_shape_infer=True)


def _cpu_kernel_missing(path: Path) -> str | None:
    """The op type the CPU provider has no kernel for in ``path`` (None: the session builds)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises NotImplemented / Fail with the op in the text
        m = _NO_KERNEL.search(str(exc))
        if m is None:
            raise
        return m.group(1)
    return None
