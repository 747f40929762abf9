"""What is installed, read from its files and never imported: the MXNet wheel (its distribution,
libmxnet.so, the libraries it needs and where the dynamic linker would find them, its GPU
kernels) and Horovod's library (what it was built with, read from its code)."""
from __future__ import annotations

import glob
import importlib.metadata as metadata
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from distft.gpu import cudalibs, elffile, gpus

FEATURE_LIBRARIES = {  # MXNet feature -> the library (soname prefix) that implies it
    "CUDA": "libcudart.so", "CUDNN": "libcudnn.so", "NCCL": "libnccl.so", "CUDA_RTC": "libnvrtc.so",
    "TENSORRT": "libnvinfer.so", "OPENMP": "libgomp.so", "BLAS_OPEN": "libopenblas.so", "BLAS_MKL": "libmkl_rt.so",
}
DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
MXNET_DISTRIBUTIONS = ("mxnet", "mxnet-cu112", "mxnet-cu117", "mxnet-cu110", "mxnet-cu102", "mxnet-native")
INSTALL_GPU = "DISTFT_EXTRA=cu112 bash launch/install.sh"


def _ldconfig_cache() -> dict:
    ldconfig = shutil.which("ldconfig") or next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig")
                                                 if os.path.exists(p)), None)
    if not ldconfig:
        return {}
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s+(\S+) \(([^)]*)\) => (\S+)", line)
        if m and ("x86-64" in m.group(2) or "AArch64" in m.group(2) or "64" in m.group(2)):
            found.setdefault(m.group(1), m.group(3))
    return found


class Resolver:
    """Where the dynamic linker would find a soname for a library: what the nvidia wheels provide
    (cudalibs.py loads those first), the library's run path, LD_LIBRARY_PATH, the ldconfig
    cache, the default folders."""

    def __init__(self):
        self.wheels = cudalibs.index()
        self._cache = None

    def find(self, soname: str, library: str, search_path=()) -> Optional[str]:
        if soname in self.wheels:
            return self.wheels[soname]
        origin = os.path.dirname(os.path.realpath(library))
        dirs = [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in search_path]
        dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
        for d in dirs:
            if os.path.exists(os.path.join(d, soname)):
                return os.path.join(d, soname)
        if self._cache is None:
            self._cache = _ldconfig_cache()
        if soname in self._cache:
            return self._cache[soname]
        for d in DEFAULT_DIRS:
            if os.path.exists(os.path.join(d, soname)):
                return os.path.join(d, soname)
        return None


def _owner(path: Optional[str]) -> Optional[str]:
    """'nvidia-cudnn-cu11 8.9.6.50' for a file a distribution installed, else None."""
    if not path:
        return None
    real = os.path.realpath(path)
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if not name.startswith("nvidia-"):
            continue
        for f in dist.files or ():
            if os.path.realpath(dist.locate_file(f)) == real:
                return f"{name} {dist.version}"
    return None


@dataclass
class MxnetBuild:
    distribution: Optional[str]
    version: Optional[str]
    library: Optional[str]
    _kernels: Optional[elffile.Kernels] = None

    @property
    def installed(self) -> bool:
        return self.library is not None

    @property
    def kernels(self) -> elffile.Kernels:
        if self._kernels is None:
            self._kernels = elffile.kernels(self.library) if self.library else elffile.Kernels()
        return self._kernels

    @property
    def is_gpu_build(self) -> bool:
        return bool(self.kernels.sass or self.kernels.ptx)


def installed_mxnet() -> MxnetBuild:
    """The installed MXNet: its distribution (mxnet, mxnet-cu112, ...) and libmxnet.so."""
    for name in MXNET_DISTRIBUTIONS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return MxnetBuild(name, version, cudalibs.mxnet_library())
    return MxnetBuild(None, None, cudalibs.mxnet_library())


def _library_entry(soname: Optional[str], resolver: Resolver, library: str, search_path) -> Optional[dict]:
    if not soname:
        return None
    path = resolver.find(soname, library, search_path)
    return {"needs": soname, "path": path, "provided_by": _owner(path)}


def read_mxnet(mx: MxnetBuild, resolver: Resolver) -> tuple:
    """(the report's "mxnet" section, problems)."""
    if not mx.installed:
        return ({"version": mx.version, "distribution": mx.distribution, "library": None, "cuda": None,
                 "cudnn": None, "nccl": None, "features": {}, "needed": {}, "kernels": {"sass": [], "ptx": []}},
                ["mxnet is not installed (no libmxnet.so); fix: bash launch/install.sh"])
    with elffile.SharedLibrary(mx.library) as lib:
        needed, search_path = lib.needed, lib.search_path
    problems, resolved = [], {}
    for soname in needed:
        path = resolver.find(soname, mx.library, search_path)
        resolved[soname] = path
        if path is None and soname != gpus.DRIVER_SONAME:
            problems.append(f"{mx.library} needs {soname}, which is not installed here; "
                            f"fix: {INSTALL_GPU if mx.is_gpu_build else 'bash launch/install.sh'}")

    def need(prefix):
        return next((s for s in needed if s.startswith(prefix)), None)

    cuda = None
    if need("libcudart.so"):
        built = re.search(r"-cu(\d+)(\d)$", mx.distribution or "")
        cuda = {**_library_entry(need("libcudart.so"), resolver, mx.library, search_path),
                "built_with": f"{built.group(1)}.{built.group(2)}" if built else None}
    section = {
        "version": mx.version,
        "distribution": mx.distribution,
        "library": mx.library,
        "cuda": cuda,
        "cudnn": _library_entry(need("libcudnn.so"), resolver, mx.library, search_path),
        "nccl": _library_entry(need("libnccl.so"), resolver, mx.library, search_path),
        # the features its linked libraries imply (ones compiled in without a library are not seen)
        "features": {name: any(s.startswith(prefix) for s in needed) for name, prefix in FEATURE_LIBRARIES.items()},
        "needed": resolved,
        "kernels": mx.kernels.to_json(),
    }
    return section, problems


def built_constant(code: Optional[bytes]) -> Optional[int]:
    """The constant a tiny `int f() { return K; }` returns, read from its machine code (x86-64:
    mov eax, K / xor eax, eax; aarch64: mov w0, #K), or None when the code is anything else."""
    if not code:
        return None
    if code.startswith(b"\xf3\x0f\x1e\xfa"):  # endbr64
        code = code[4:]
    if code[:1] == b"\xb8" and code[5:6] == b"\xc3":
        return int.from_bytes(code[1:5], "little")
    if code[:3] in (b"\x31\xc0\xc3", b"\x33\xc0\xc3"):
        return 0
    if len(code) >= 8 and code[4:8] == b"\xc0\x03\x5f\xd6":
        word = int.from_bytes(code[:4], "little")
        if word & 0xFFE0001F == 0x52800000:  # movz w0, #imm16
            return (word >> 5) & 0xFFFF
    return None


def horovod_library() -> Optional[str]:
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "mxnet", "mpi_lib*.so")))
    return found[0] if found else None


def read_horovod(mx: MxnetBuild, resolver: Resolver) -> tuple:
    """(the report's "horovod" section, Horovod's kernels, problems). mpi/gloo/nccl are what
    Horovod's own horovod_*_built() return, read from their code in its library."""
    try:
        version = metadata.version("horovod")
    except metadata.PackageNotFoundError:
        version = None
    library = horovod_library()
    section = {"version": version, "library": library, "mpi": None, "gloo": None, "nccl": None,
               "nccl_version": None, "cuda": None, "kernels": {"sass": [], "ptx": []}}
    if not library:
        return section, elffile.Kernels(), ["horovod (its MXNet library) is not installed; fix: bash launch/install.sh"]
    problems = []
    with elffile.SharedLibrary(library) as lib:
        needed, search_path = lib.needed, lib.search_path
        for what in ("mpi", "gloo", "nccl", "cuda"):
            value = built_constant(lib.function_bytes(f"horovod_{what}_built"))
            section[what] = None if value is None else bool(value)
            if what == "nccl" and value and value > 1:  # Horovod returns NCCL_VERSION_CODE
                section["nccl_version"] = f"{value // 10000}.{value % 10000 // 100}.{value % 100}"
        kernels = lib.kernels()
    for what, prefix in (("mpi", "libmpi.so"), ("nccl", "libnccl.so")):
        if section[what] is None:  # code not recognised: the library it links tells
            section[what] = any(s.startswith(prefix) for s in needed)
    section["kernels"] = kernels.to_json()
    for soname in needed:
        if soname == "libmxnet.so":
            continue  # taken from the mxnet package, which Horovod imports first
        if soname != gpus.DRIVER_SONAME and resolver.find(soname, library, search_path) is None:
            problems.append(f"{library} needs {soname}, which is not installed here; fix: bash launch/install.sh")
    if mx.is_gpu_build and section["nccl"] is False:
        problems.append(f"horovod {version} was built without NCCL: GPU gradients cannot be exchanged; "
                        f"fix: {INSTALL_GPU} (it builds Horovod with HOROVOD_GPU_OPERATIONS=NCCL)")
    if not mx.is_gpu_build and section["nccl"]:
        problems.append(f"horovod {version} was built with NCCL against a GPU MXNet, but {mx.distribution} "
                        "is a CPU build; fix: bash launch/install.sh")
    return section, kernels, problems
