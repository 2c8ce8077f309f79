"""Saving ONNX models and pruning their graphs, shared by the export stages (quantize.py, grid.py, fp16.py,
pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import onnx


def save_onnx(model: onnx.ModelProto, dst: Path) -> None:
    """Save ``model``; weights go to ``<dst>.data`` beside it when the model is too big for one protobuf."""
    # the initializers' bytes, not model.ByteSize(): protobuf cannot size a message past 2 GB
    if sum(len(t.raw_data) for t in model.graph.initializer) > 1_500_000_000:
        onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save_model(model, str(dst))


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node reads any more (the weights a rewrite replaced)."""
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
