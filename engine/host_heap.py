"""The C heap under loading and unloading models (glibc only; elsewhere every function is a no-op).

Loading a model allocates from several threads (ONNX Runtime's session loaders, the scheduler), and
glibc gives each thread its own arena (up to 8 per core). Freed model memory inside those arenas stays
behind fragmentation, even after ``malloc_trim``: measured on the defaults (12 load/unload cycles of
SmolLM2 int4 + MiniLM, RSS after each unload), it wandered 85-185 MB (+99 MB). With at most 2 arenas
(``limit_arenas``, set before the first load) it stayed at 85-87 MB, first token unchanged (0.08-0.10 s).
Pinning the mmap threshold at 4 MiB also held RSS (+4 MB) but made the first token 0.1-0.37 s (fresh
pages for ORT's buffers), so this limits the arenas instead.
"""

from __future__ import annotations

import ctypes
import gc
import os

_M_ARENA_MAX = -8  # glibc mallopt parameter
MAX_ARENAS = 2
_limited = False


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def limit_arenas(n: int = MAX_ARENAS) -> bool:
    """At most ``n`` malloc arenas for the rest of the process (threads made later share them), so
    unloaded models hand their memory back. Once per process; skipped when the user set MALLOC_ARENA_MAX
    themselves or TTA_ENGINE_LIMIT_ARENAS=0. True when it is in effect."""
    global _limited
    if _limited:
        return True
    if "MALLOC_ARENA_MAX" in os.environ or os.environ.get("TTA_ENGINE_LIMIT_ARENAS", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    _limited = bool(libc.mallopt(_M_ARENA_MAX, int(n)))
    return _limited


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so RSS
    would not drop after an unload)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
