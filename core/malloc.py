"""glibc's malloc set for this program's allocations (:func:`keep_freed_memory`).

A fit step allocates and frees many tensors of 0.1-10 MB, a composed frame a few of 3-8 MB,
and the next step allocates the same sizes again. glibc serves a block above its mmap
threshold with pages of its own from the kernel, and returns freed memory at the top of
its heap beyond the trim threshold to the kernel; either way the next tensor of that size
faults its pages in again, each one zeroed by the kernel first. Its defaults (128 KB,
raised as such blocks are freed up to 32 MB, the trim threshold twice that) still leave a
large share of the time in page faults: on the 20 s sample video (2 workers, 2 cores) the
command's processes used 27.6-28.9 CPU-s, and 25.7-26.4 with the thresholds below (rounds
alternating, docs/performance.md "Freed memory kept"). Setting only the trim threshold
fixes the mmap threshold at 128 KB: 40-42 CPU-s; only the mmap threshold: no change.

So blocks up to MMAP_THRESHOLD come from the heap, and up to TRIM_THRESHOLD of freed memory
at its top stays with the process for the next allocation. The cost: a process keeps up to
that much more memory after its peak (the sample video's processes peaked at 1.87 GB
together against 1.70 GB; 2.03 GB with a 256 MB trim threshold, for no less CPU).
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 128 << 20
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring) for this process and the
    processes it forks from now on; once per process. False where there is no glibc (or
    it refuses): nothing changes there."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own symbols: glibc's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting the trim threshold alone fixes the mmap one at 128 KB.
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False
