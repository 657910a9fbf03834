"""Keep freed memory in the process (glibc's malloc), so large tensors freed and allocated again every update do not
go back to the operating system and fault in again page by page.

PyTorch allocates CPU tensors with the C library's ``malloc`` and has no caching allocator on CPU. With glibc's
defaults, a block above the mmap threshold (128 KiB, raised adaptively up to 32 MiB) is mapped on allocation and
unmapped on free, and the top of the heap is returned above 128 KiB free; a training step that allocates and frees
tens of megabytes of per-sequence buffers (the RIM's tape and gradient buffers, an LSTM's workspace) then pays a
page fault per 4 KiB touched, every step. :func:`keep_freed_memory` raises both thresholds: the effect CPU tuning
guides for PyTorch (Intel's, for one) get by preloading jemalloc or TCMalloc (``LD_PRELOAD``; that works here too).

The ``rims-rl`` command and the benchmark scripts call it at start; a library user can call it too. It is a process
setting (memory freed by the process is kept for reuse instead of being returned, up to ``TRIM_THRESHOLD`` at the
top of the heap), so importing :mod:`rims_rl` never does it.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 64 << 20
"""Blocks below this many bytes come from the heap (kept for reuse when freed) instead of their own mapping."""
TRIM_THRESHOLD = 512 << 20
"""Free memory at the top of the heap is returned to the operating system only beyond this many bytes."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) for this
    process. Returns whether it did: not off Linux or glibc, not where the user tunes malloc already (the
    ``MALLOC_*_`` or ``GLIBC_TUNABLES`` environment variables), not with ``RIMS_RL_MALLOC=default``."""
    if os.environ.get("RIMS_RL_MALLOC", "") == "default" or any(name in os.environ for name in _USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
