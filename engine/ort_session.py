"""ONNX Runtime session creation with options chosen for the machine."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BackendUnavailableError


def physical_cores() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


def providers(device: str = "auto") -> list[str]:
    """CUDA when onnxruntime-gpu and a GPU are present (device auto/cuda), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise BackendUnavailableError(
            "device='cuda' needs onnxruntime-gpu and a CUDA GPU: `pip install 'tta-engine[gpu]'`."
        )
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(path: Path, *, threads: int | None = None, device: str = "auto"):
    """An InferenceSession with all graph optimizations and intra-op threads = physical cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or int(os.environ.get("TTA_ENGINE_THREADS", 0)) or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=providers(device))
