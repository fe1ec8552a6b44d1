"""The C library's allocator, set up for a training loop.

Every step frees and reallocates the same activation and gradient buffers. With glibc's defaults,
buffers above its (adaptive) mmap threshold are mapped and unmapped each step, and freed memory at
the top of the heap goes back to the kernel, so each step faults in fresh zeroed pages: ~300 a step
for the MLP here, and 30-40% of its step time on this VM. Fixed thresholds keep freed memory in the
process for the next step. A plain loop gets the same with GLIBC_TUNABLES (docs/benchmark.md).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: larger blocks (big weights) are still mapped
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top before any is given back


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for reuse; False where the C library is not glibc (nothing to tune)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
