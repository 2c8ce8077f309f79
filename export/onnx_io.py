"""Saving ONNX models, shared by the export stages (quantize.py, fp16.py, pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import onnx


def save_onnx(model: onnx.ModelProto, dst: Path) -> None:
    """Save ``model``; weights go to ``<dst>.data`` beside it when the model is too big for one protobuf."""
    if model.ByteSize() > 1_500_000_000:
        onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save_model(model, str(dst))
