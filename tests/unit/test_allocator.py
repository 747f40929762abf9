"""How a training process holds memory (distft.allocator): large buffers a step frees go back to
the system, and MXNet keeps one CPU workspace per worker thread."""
import ctypes
import os
import subprocess
import sys

import pytest

from distft import allocator

PROBE = r"""
import ctypes, sys
from distft import allocator
if sys.argv[1] == "fixed":
    assert allocator.return_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.free(libc.malloc(1 << 20))  # a large block freed: glibc's dynamic threshold rises past it
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)  # a step's temporary
print(libc.mallinfo2().hblks - before)  # 1: its own mapping, returned when freed; 0: the heap
"""


def _glibc_with_mallinfo2() -> bool:
    libc = ctypes.CDLL(None)
    return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")


def _mapped(mode: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="the fix is glibc's mallopt; this C library has no mallinfo2")
def test_a_large_block_after_one_was_freed_gets_its_own_mapping_only_with_the_fixed_threshold():
    assert _mapped("default") == 0  # glibc's dynamic threshold: from the heap, kept resident once freed
    assert _mapped("fixed") == 1


def test_a_users_own_malloc_settings_stand():
    assert allocator.user_set({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert allocator.user_set({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert allocator.user_set({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert not allocator.user_set({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX", "PATH": "/bin"})


WORKSPACE_PROBE = r"""
import distft.cli, distft.train.run  # all that `python -m distft` imports before it trains
from distft import allocator
with allocator.one_workspace_per_worker() as copies:  # as distft.train.run enters it
    print(copies)
    import mxnet as mx
    from mxnet import autograd, gluon
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(512, 3, padding=1, in_channels=512), gluon.nn.Conv2D(512, 3, padding=1, in_channels=512))
    net.initialize()
    net.hybridize(static_alloc=True, static_shape=True)
    x = mx.nd.ones((8, 512, 4, 4))
    def peak_mib():
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) >> 10
    before = peak_mib()
    for _ in range(8):  # training steps of two 3x3 512-channel convolutions (9 MiB of weights each)
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
    mx.nd.waitall()
    print(peak_mib() - before)
"""


def _onednn_convolutions() -> bool:
    """Whether MXNet's convolutions run on oneDNN, whose weight reorders fill the workspaces
    (without it a convolution asks for a fraction of a MiB)."""
    import mxnet as mx
    return mx.runtime.Features().is_enabled("MKLDNN") and os.environ.get("MXNET_MKLDNN_ENABLED", "1") != "0"


def _workspace_run(env: dict) -> tuple:
    """(MXNET_CPU_TEMP_COPY in force, peak RSS growth in MiB over 8 steps) of a fresh process."""
    base = {k: v for k, v in os.environ.items() if k not in (allocator.TEMP_COPY, allocator.CPU_WORKERS)}
    out = subprocess.run([sys.executable, "-c", WORKSPACE_PROBE], capture_output=True, text=True, check=True,
                         env={**base, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or not _onednn_convolutions(),
                    reason="reads the peak from /proc (Linux); the workspaces fill with oneDNN's reorders")
def test_one_workspace_per_cpu_worker_lowers_a_training_steps_peak():
    copies, one = _workspace_run({})
    users, four = _workspace_run({allocator.TEMP_COPY: "4"})  # MXNet's default, set by the user: it stands
    assert (copies, users) == ("1", "4")
    # each of MXNet's four workspaces grows to a convolution's weight reorders: ~55 MiB measured
    assert four - one >= 30, (one, four)


@pytest.mark.parametrize("env, copies", [
    ({}, "1"),
    ({allocator.CPU_WORKERS: "3"}, "3"),
    ({allocator.CPU_WORKERS: "16"}, "4"),  # never more than MXNet's own default
    ({allocator.CPU_WORKERS: "many"}, "1"),
    ({allocator.CPU_WORKERS: "0"}, "1"),
    ({allocator.TEMP_COPY: " "}, "1"),  # blank: MXNet's default, not a choice
    ({allocator.TEMP_COPY: "2", allocator.CPU_WORKERS: "3"}, "2"),  # the user's stands
])
def test_workspace_copies_follow_the_cpu_worker_threads_for_the_run_only(env, copies):
    environ = dict(env)
    with allocator.one_workspace_per_worker(environ) as in_force:
        assert in_force == copies == environ[allocator.TEMP_COPY].strip()
        assert allocator.temp_copies_set(environ) == copies
    assert environ == env  # as found: a later process started from here is not given it
