"""Giving memory back to the OS after a burst of large requests (the HTTP front end and the gateway).

glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after the first burst
every 20 MB body is carved from the heap, whose fragmented top is never returned: RSS stays at the burst's peak.
A fixed threshold keeps large buffers on their own mappings (unmapped when freed), and `malloc_trim` hands back
what the heap freed once the process is idle. Elsewhere than glibc both are no-ops."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable

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


def trim(collect: bool = True) -> None:
    """Collect cycles (when `collect`), then return freed heap pages to the OS (glibc malloc_trim, which releases
    the GIL while it walks the heaps)."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def trim_periodically(idle: Callable[[], bool], every_s: float = 1.0, slack_bytes: int = 64 << 20) -> None:
    """Every `every_s`: when RSS has grown `slack_bytes` past what the last trim left, trim (gRPC reads a large
    message as many small heap blocks, and the freed heap otherwise stays with the process, under load too); cycles
    are collected only while idle, so a loaded event loop never waits on a full collection."""
    floor = rss_bytes()
    while True:
        await asyncio.sleep(every_s)
        if rss_bytes() > floor + slack_bytes:
            await asyncio.to_thread(trim, idle())
            floor = rss_bytes()
