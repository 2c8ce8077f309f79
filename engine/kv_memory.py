"""Where a decoder's KV cache and outputs live, behind one small interface used by the binding code.

- :class:`HostMemory` (the CPU fast path): numpy arrays, bound to ONNX Runtime by address with device
  'cpu'. Row operations are numpy slicing.
- :class:`OrtValueMemory` (device-resident: CUDA, or the CPU for tests of the same path): buffers
  allocated by ONNX Runtime on the device (``OrtValue.ortvalue_from_shape_and_type``), bound by address
  with the device's name; row operations (prefix reuse, growth, packing rows) use zero-copy PyTorch
  views of that memory (DLPack), which slice like numpy. Only what the caller asks for
  (:meth:`to_host`: the last-position logits) crosses to the host.

Both hand out array objects that support ``a[i, :, :n]`` reads and assignment, ``.shape``, and views of
leading-axis slices whose address :meth:`ptr` gives, so the IO-binding code and the scheduler's row
operations are the same for every device.
"""

from __future__ import annotations

import numpy as np

from .device import CPU, ORT_GPU_INSTALL, Device
from .errors import BackendUnavailableError


class HostMemory:
    """numpy buffers in host memory (ONNX Runtime's CPU provider reads and writes them in place)."""

    device = CPU
    ort_device = ("cpu", 0)

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    @staticmethod
    def ptr(a: np.ndarray) -> int:
        return a.ctypes.data

    @staticmethod
    def to_host(a) -> np.ndarray:
        """A host copy (the binding's buffers are reused by the next step)."""
        return np.array(a, copy=True)

    @staticmethod
    def clone(a: np.ndarray) -> np.ndarray:
        return a.copy()

    @staticmethod
    def from_ortvalue(value) -> np.ndarray:
        return value.numpy()

    def sync(self) -> None:
        """Nothing: numpy writes are done when they return."""


class OrtValueMemory:
    """Buffers allocated by ONNX Runtime on ``device`` and viewed through PyTorch (no copies)."""

    def __init__(self, device: Device):
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailableError(
                "a device-resident KV cache uses PyTorch views of ONNX Runtime's device memory for its row "
                f"operations; install it with `{ORT_GPU_INSTALL}` (which brings torch via bitsandbytes)"
            ) from exc
        self.torch = torch
        self.device = device
        self.ort_device = (device.kind, device.index)

    def empty(self, shape, dtype):
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, *self.ort_device)
        return self.torch.from_dlpack(value)  # shares the memory and keeps the OrtValue alive

    def zeros(self, shape, dtype):
        return self.empty(shape, dtype).zero_()

    @staticmethod
    def ptr(a) -> int:
        return a.data_ptr()

    @staticmethod
    def to_host(a) -> np.ndarray:
        return a.detach().to("cpu", copy=True).numpy()

    @staticmethod
    def clone(a):
        return a.clone()

    def from_ortvalue(self, value):
        return self.torch.from_dlpack(value)

    def sync(self) -> None:
        """Wait for PyTorch's row operations (queued on torch's CUDA stream) before ONNX Runtime, on its
        own stream, reads the buffers. (ORT's run returns after its own stream is done.)"""
        if self.device.is_cuda:
            self.torch.cuda.current_stream(self.device.index).synchronize()


def kv_memory(device: Device, *, device_resident: bool | None = None):
    """The memory for a decoder on ``device``: host numpy on the CPU (unless ``device_resident`` asks for
    the device path there, which tests use), ORT-allocated device memory on CUDA."""
    if device.is_cuda or device_resident:
        return OrtValueMemory(device)
    return HostMemory()
