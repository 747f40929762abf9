"""Large buffers a training step frees go back to the system (distft.allocator)."""
import subprocess
import sys

PROBE = r"""
import ctypes, sys
from distft import allocator
if sys.argv[1] == "fixed":
    assert allocator.return_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024
libc.free(libc.malloc(1 << 20))  # a first large block freed: glibc raises its threshold past it
base = rss_mb()
blocks = [libc.malloc(1 << 20) for _ in range(200)]  # a step's temporaries, 200 MiB
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
pin = libc.malloc(64)  # something still in use above them, as in a real heap
for b in blocks:
    libc.free(b)
print(round(rss_mb() - base))
"""


def _kept_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_large_blocks_stay_resident_under_default_malloc_and_are_returned_with_the_fixed_threshold():
    assert _kept_mb("default") > 150  # the behaviour the module exists for (glibc's dynamic threshold)
    assert _kept_mb("fixed") < 20
