"""Large buffers a training step frees go back to the system (distft.allocator)."""
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
