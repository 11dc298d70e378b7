"""Giving memory back to the OS after a burst of large requests (the HTTP front end and the gateway).

glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after the first burst
every 20 MB body is carved from the heap, whose fragmented top is never returned: RSS stays at the burst's peak.
A fixed threshold keeps large buffers on their own mappings (unmapped when freed), and `malloc_trim` hands back
what the heap freed once the process is idle. Elsewhere than glibc both are no-ops."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
M_ARENA_MAX = -8
DEFAULT_MMAP_THRESHOLD = 256 * 1024


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def tune_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, arena_max: int = 2) -> bool:
    """Fix the mmap threshold (large blocks unmapped on free) and cap malloc arenas (gRPC's threads each get one
    otherwise). Call once at process start. MALLOC_MMAP_THRESHOLD_ / MALLOC_ARENA_MAX set by an operator win."""
    if _LIBC is None:
        return False
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= bool(_LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    if "MALLOC_ARENA_MAX" not in os.environ:
        ok &= bool(_LIBC.mallopt(M_ARENA_MAX, arena_max))
    return ok


def trim() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
