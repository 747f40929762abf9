"""The C allocator's policy for a training process: freed large buffers go back to the system.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
the per-step temporaries of a training loop (decoded batches, host staging, MXNet's imperative
arrays) come to live in its heap and arenas, and what they free stays resident. A fixed
threshold of 128 KiB returns each large block when freed. Measured: resnet50_v2 last stage +
head, 64 px, 2 ranks on 2 cores: peak RSS per rank 606-641 MB before, 572-579 MB after, with no
change in samples/s (docs/benchmarks.md)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024


def user_set(environ) -> bool:
    """Whether the user chose malloc's thresholds (or another allocator) for this process."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(k in environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
        "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables or \
        "malloc" in environ.get("LD_PRELOAD", "")


def return_freed_memory() -> bool:
    """Fix malloc's mmap and trim thresholds (glibc; elsewhere nothing to do: False). Whatever a
    user set (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES, an allocator in
    LD_PRELOAD) stands. Process-wide: an in-process caller (a test) keeps it."""
    if user_set(os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
