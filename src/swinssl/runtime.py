"""Process-level settings that make CPU training faster without changing any result."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the kernel (no mmap, no trimming).

    Large activations are otherwise mmapped on allocation and unmapped on free, and every
    training step pays page faults to zero them again: measured here, a 96^3 SwinUNETR
    step spends about a third of its time there. Keeping the memory makes the step about
    1.4x faster at about 1.3x the peak resident memory. Returns False where it does not
    apply (not Linux/glibc). Call it before large tensors are allocated.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return ok
