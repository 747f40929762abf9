"""How a training process holds memory: freed large buffers go back to the system, and MXNet
keeps one temporary workspace per CPU worker thread.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
the per-step temporaries of a training loop (decoded batches, host staging, MXNet's imperative
arrays) come to live in its heap and arenas, and what they free stays resident. A fixed
threshold of 128 KiB returns each large block when freed. Measured: resnet50_v2 last stage +
head, 64 px, 2 ranks on 2 cores: peak RSS per rank 606-641 MB before, 572-579 MB after, with no
change in samples/s (docs/benchmarks.md).

MXNet keeps MXNET_CPU_TEMP_COPY (default 4) temporary workspaces on the CPU and hands them to
operators in turn; each grows to the largest request made of it and never shrinks. oneDNN's
convolutions ask for room to reorder their weights and weight gradients (9 MiB for each 3x3
512-channel kernel), so the four copies grow alike and hold four times what one step needs at
once. Operators run one at a time on MXNet's CPU worker thread (MXNET_CPU_WORKER_NTHREADS,
default 1), so one copy per worker thread is all they can use (each thread that queues
operators has workspaces of its own: the main thread, MXNet's custom-operator thread). Measured
on the same job: peak RSS per rank 549-557 MiB with four copies, 497-501 MiB with one,
samples/s unchanged."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Optional

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024
TEMP_COPY = "MXNET_CPU_TEMP_COPY"  # read per thread, at its first request for a workspace
MXNET_TEMP_COPIES = 4  # MXNet's default
CPU_WORKERS = "MXNET_CPU_WORKER_NTHREADS"


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


def temp_copies_set(environ=os.environ) -> Optional[str]:
    """MXNET_CPU_TEMP_COPY as MXNet will read it (None: unset or blank, MXNet's default 4)."""
    return environ.get(TEMP_COPY, "").strip() or None


@contextlib.contextmanager
def one_workspace_per_worker(environ=os.environ):
    """For the duration of a run: MXNet's CPU workspace copies (MXNET_CPU_TEMP_COPY) as many as
    its CPU worker threads (1 unless MXNET_CPU_WORKER_NTHREADS says more; never more than
    MXNet's own 4), unless the user set them. Yields the value in force. MXNet reads it once per
    thread that queues operators, at that thread's first request for a workspace: `distft
    train` enters this before anything else, and leaves the environment as it found it (an
    in-process caller that already ran MXNet keeps MXNet's copies on that thread)."""
    users = temp_copies_set(environ)
    if users:
        yield users
        return
    before = environ.get(TEMP_COPY)  # unset or blank
    workers = environ.get(CPU_WORKERS, "").strip()
    threads = int(workers) if workers.isascii() and workers.isdigit() else 0
    environ[TEMP_COPY] = str(min(threads, MXNET_TEMP_COPIES)) if threads > 0 else "1"
    try:
        yield environ[TEMP_COPY]
    finally:
        if before is None:
            environ.pop(TEMP_COPY, None)
        else:
            environ[TEMP_COPY] = before
