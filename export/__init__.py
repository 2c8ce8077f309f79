"""The export stage (extra ``export``): PyTorch model in, validated ONNX artifact out."""

from tta_engine.extras import require_extra

require_extra("export", "exporting a model (tta_engine.export)")
