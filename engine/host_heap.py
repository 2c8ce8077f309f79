"""The C heap under loading and unloading models (glibc only; elsewhere every function is a no-op).

A model's weights, ONNX Runtime's buffers and the KV cache are large allocations. glibc serves those with
mmap and returns them to the OS on free, but each such free also *raises* its mmap threshold (dynamically,
up to 32 MiB): after the first model is unloaded, the next model's multi-MB buffers come from the heap
arenas instead, where freed memory stays behind fragmentation. Measured on the int4 SmolLM2 default
(benchmarks/soak.py, 20 load/unload cycles): RSS after each unload wandered between 102 and 218 MB;
with the threshold pinned at 4 MiB it stayed within 83-87 MB (as with MALLOC_ARENA_MAX=1).
"""

from __future__ import annotations

import ctypes
import gc
import os

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 4 << 20
_pinned = False


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``nbytes`` and more with mmap for the rest of the process (which also turns off
    glibc's dynamic threshold), so unloaded models hand their memory back. Once per process; skipped when
    the user set MALLOC_MMAP_THRESHOLD_ themselves or TTA_ENGINE_PIN_MMAP=0. True when it is in effect."""
    global _pinned
    if _pinned:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("TTA_ENGINE_PIN_MMAP", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    _pinned = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    return _pinned


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so RSS
    would not drop after an unload)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
