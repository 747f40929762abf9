"""Stand-ins for the CUDA driver (libcuda.so.1), built with gcc by the tests that need one: the
machine and CI have no GPU and no driver. Used only by tests, through LD_LIBRARY_PATH or a path.

- `imported` symbols (what libmxnet.so / Horovod import from the driver) exist so that the
  dynamic linker can load those libraries; they return CUDA_ERROR_NO_DEVICE (100).
- `gpus` makes a driver that answers the driver API calls distft/gpus.py makes, for those GPUs.
  Without it, the library has no cuDriverGetVersion: it is no driver at all, only a stub."""
import os
import re
import subprocess

DRIVER_API = """
#include <stddef.h>
#include <string.h>
static const char* names[] = {%(names)s};
static const int majors[] = {%(majors)s}, minors[] = {%(minors)s};
static const size_t memory[] = {%(memory)s};
int cuDriverGetVersion(int* v) { *v = %(cuda)d; return 0; }
int cuInit(unsigned flags) { return %(init)d; }
int cuDeviceGetCount(int* n) { *n = %(count)d; return 0; }
int cuDeviceGet(int* d, int i) { *d = i; return 0; }
int cuDeviceGetName(char* name, int len, int d) { strncpy(name, names[d], len); return 0; }
int cuDeviceGetAttribute(int* v, int attr, int d) { *v = attr == 75 ? majors[d] : attr == 76 ? minors[d] : 0; return 0; }
int cuDeviceTotalMem_v2(size_t* bytes, int d) { *bytes = memory[d]; return 0; }
int cuGetErrorName(int code, const char** s) { *s = code == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN"; return 0; }
"""


def build_driver(folder, imported=(), gpus=None, cuda=12020, init=0, version="535.104.05") -> str:
    """Build FOLDER/libcuda.so.VERSION (soname libcuda.so.1) and the libcuda.so.1 link to it;
    returns FOLDER. `gpus`: [(name, major, minor, memory_bytes)], or None for a bare stub."""
    os.makedirs(folder, exist_ok=True)
    api = set(re.findall(r"^int (cu\w+)\(", DRIVER_API, re.M)) if gpus is not None else set()
    source = "".join(f"int {name}(void) {{ return 100; }}\n" for name in sorted(set(imported) - api))
    if gpus is not None:
        rows = gpus or [("none", 0, 0, 0)]
        source += DRIVER_API % {
            "names": ", ".join(f'"{g[0]}"' for g in rows), "majors": ", ".join(str(g[1]) for g in rows),
            "minors": ", ".join(str(g[2]) for g in rows), "memory": ", ".join(f"{g[3]}UL" for g in rows),
            "cuda": cuda, "init": init, "count": len(gpus)}
    c_file = os.path.join(folder, "libcuda.c")
    with open(c_file, "w") as fh:
        fh.write(source)
    real = f"libcuda.so.{version}"
    gcc = subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", os.path.join(folder, real), c_file],
                         capture_output=True, text=True)
    assert gcc.returncode == 0, gcc.stderr
    link = os.path.join(folder, "libcuda.so.1")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(real, link)
    return folder


def driver_imports(*libraries) -> set:
    """The driver API functions (cuXxx) these libraries import, read from their dynamic symbols."""
    from distft.gpu import elffile

    found = set()
    for path in libraries:
        with elffile.SharedLibrary(path) as lib:
            found |= {s for s in lib.dynamic_symbols(defined=False) if s.startswith("cu") and s[2:3].isupper()}
    return found
