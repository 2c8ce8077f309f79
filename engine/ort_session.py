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
    """An InferenceSession with all graph optimizations and intra-op threads = physical cores.

    The pool's workers spin between the parallel sections of a run (fast) but stop as soon as the run
    returns (``session.force_spinning_stop``): otherwise they spin on after each run and, on a small CPU,
    take the cores from the next run of *another* session -- an int4 artifact's int8 prefill graph after
    its int4 decode graph, or another loaded model (measured: a 20-token prefill after decoding took
    26-45 ms instead of 18 ms, the decode steps after a prefill 20 ms instead of 11 ms). Within a run they
    still spin: a decode step costs the same either way (9.7 ms, A/B alternated)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or int(os.environ.get("TTA_ENGINE_THREADS", 0)) or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=so, providers=providers(device))
