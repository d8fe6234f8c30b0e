"""The C heap of an image process: freed memory stays for the next image.

Decoding, resizing and encoding allocate and free megabytes per image. With glibc's defaults
much of that goes back to the kernel on every free (allocations over the mmap threshold are
unmapped, the heap's top is trimmed) and comes back as page faults on the next image: about
100 faults and ~0.1-0.15 ms of kernel time per image of the benchmark's mix, in the image
processes (docs/performance.md). `keep_freed_memory` raises both thresholds (and
the heap's growth step) so that an image process keeps up to the given amount of freed memory
for reuse; its resident size then stays at its high-water mark (bounded by the largest images
it has handled) instead of shrinking between images.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above 32 MiB on 64-bit (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD_MAX = 32 << 20
_TOP_PAD_MAX = 64 << 20


def keep_freed_memory(keep_mb: int) -> bool:
    """Let this process's C heap keep up to `keep_mb` MiB of freed memory for reuse (glibc).

    Returns whether the allocator took the settings: False for `keep_mb` <= 0 (the C
    library's defaults stay) and where there is no glibc `mallopt` (musl, macOS).
    """
    if keep_mb <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    keep = keep_mb << 20
    settings = (
        (_M_MMAP_THRESHOLD, min(keep, _MMAP_THRESHOLD_MAX)),
        (_M_TRIM_THRESHOLD, min(keep, 2**31 - 1)),
        (_M_TOP_PAD, min(keep, _TOP_PAD_MAX)),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
