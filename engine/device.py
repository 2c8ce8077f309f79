"""Which device a model runs on: one resolver for both backends.

A device setting is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (model config field ``device``, the
manager's ``device=`` option, the CLI's ``--device``). :func:`resolve_device` turns it into a
:class:`Device` for a backend:

- ``auto`` takes the GPU when the backend can use it -- ONNX Runtime: ``CUDAExecutionProvider`` among
  ``onnxruntime.get_available_providers()`` *and* memory can be allocated on the device; PyTorch:
  ``torch.cuda.is_available()`` -- and the CPU otherwise.
- ``cuda`` / ``cuda:N`` with no usable GPU raises :class:`BackendUnavailableError` with the install
  command. An explicit ``cuda`` never falls back to the CPU silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BackendUnavailableError, ConfigError

DEVICE_BACKENDS = ("onnx", "torch")
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
ORT_GPU_INSTALL = "pip install 'tta-engine[gpu]'"
TORCH_GPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu126"  # a CUDA build


@dataclass(frozen=True)
class Device:
    """A resolved device: ``kind`` 'cpu' or 'cuda', the device ``index``, and who runs on it
    (``provider``: an ONNX Runtime execution provider name, or 'torch')."""

    kind: str
    index: int = 0
    provider: str = "CPUExecutionProvider"

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_name(self) -> str:
        """The name torch uses ('cpu', 'cuda:0')."""
        return str(self)


CPU = Device("cpu")


def parse_device(value: str) -> tuple[str, int | None]:
    """``'auto' | 'cpu' | 'cuda' | 'cuda:N'`` -> (kind, index or None); anything else: ConfigError."""
    m = _PATTERN.match(value.strip().lower()) if isinstance(value, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"device {value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index)")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def resolve_device(requested: str | Device | None, backend: str) -> Device:
    """The device a model on ``backend`` ('onnx' | 'torch') runs on for the setting ``requested``."""
    if isinstance(requested, Device):
        return requested
    if backend not in DEVICE_BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {DEVICE_BACKENDS}")
    kind, index = parse_device(requested or "auto")
    if kind == "cpu":
        return Device("cpu", 0, "torch" if backend == "torch" else "CPUExecutionProvider")
    probe = _ort_cuda if backend == "onnx" else _torch_cuda
    reason = probe(index or 0)
    if reason is None:
        return Device("cuda", index or 0, "torch" if backend == "torch" else "CUDAExecutionProvider")
    if kind == "auto":
        return Device("cpu", 0, "torch" if backend == "torch" else "CPUExecutionProvider")
    install = ORT_GPU_INSTALL if backend == "onnx" else TORCH_GPU_INSTALL
    what = "ONNX Runtime" if backend == "onnx" else "PyTorch"
    raise BackendUnavailableError(
        f"device={requested!r} asks for a GPU, but {what} cannot use one here: {reason}. "
        f"Install GPU support with `{install}`, or set device='cpu' (or 'auto')."
    )


def _ort_cuda(index: int) -> str | None:
    """None when ONNX Runtime can run on CUDA device ``index``, else why not."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (the CPU package 'onnxruntime' "
                "is installed, not 'onnxruntime-gpu')")
    try:  # the provider is compiled in; is there a device (and the CUDA libraries) to allocate on?
        ort.OrtValue.ortvalue_from_shape_and_type((1,), np.float32, "cuda", index)
    except Exception as exc:  # noqa: BLE001 - ORT raises RuntimeError/Fail for a missing device or library
        return f"no CUDA device {index} could be used ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return None


def _torch_cuda(index: int) -> str | None:
    """None when PyTorch can run on CUDA device ``index``, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = getattr(torch.version, "cuda", None)
        return (f"torch {torch.__version__} " + ("sees no CUDA device" if build else "is a CPU-only build"))
    if index >= torch.cuda.device_count():
        return f"there are {torch.cuda.device_count()} CUDA devices, so index {index} does not exist"
    return None
