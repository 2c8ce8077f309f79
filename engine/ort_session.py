"""ONNX Runtime session creation with options chosen for the machine."""

from __future__ import annotations

import os
from pathlib import Path

from .device import Device, resolve_device


def physical_cores() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


def providers(device: Device, *, cuda_graph: bool = False) -> list:
    """The execution providers for a resolved device: CUDA (on that device, CPU for the rest) or CPU.
    ``cuda_graph``: capture the run as a CUDA graph and replay it (ORT's ``enable_cuda_graph``; see
    OrtDecoder for the conditions)."""
    if device.is_cuda:
        options = {"device_id": str(device.index)}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(path: Path, *, threads: int | None = None, device: str | Device = "auto",
                   cuda_graph: bool = False, prepack: bool = True, profile_prefix: str | None = None):
    """An InferenceSession with all graph optimizations and intra-op threads = physical cores.

    The pool's workers spin between the parallel sections of a run (fast) but stop as soon as the run
    returns (``session.force_spinning_stop``): otherwise they spin on after each run and, on a small CPU,
    take the cores from the next run of *another* session -- an int4 artifact's int8 prefill graph after
    its int4 decode graph, or another loaded model (measured: a 20-token prefill after decoding took
    26-45 ms instead of 18 ms, the decode steps after a prefill 20 ms instead of 11 ms). Within a run they
    still spin: a decode step costs the same either way (9.7 ms, A/B alternated).

    ``device``: a setting ('auto', 'cpu', 'cuda', 'cuda:N') or a resolved :class:`Device`. ``prepack=False``
    keeps every weight in its stored layout (no second, kernel-packed copy; much slower int4): the
    export's fp32 check of a model whose weights fit in memory only once. ``profile_prefix``: ONNX Runtime's
    profiler on (a JSON trace per session, written by ``session.end_profiling()``; benchmarks/
    compare_throughput.py reads its per-node kernel times)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or int(os.environ.get("TTA_ENGINE_THREADS", 0)) or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=so,
                                providers=providers(resolve_device(device, "onnx"), cuda_graph=cuda_graph))
