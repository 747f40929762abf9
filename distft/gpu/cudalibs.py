"""The CUDA user-space libraries of a GPU install (cuDNN, cuBLAS, NCCL, ... from the nvidia-*-cu11
wheels, under site-packages/nvidia/*/lib), found without LD_LIBRARY_PATH.

libmxnet.so names them by soname only (libcudnn.so.8, ...) and its run path is its own folder, so
the dynamic linker cannot find them. `preload()` loads, before MXNet, every library of those
folders that libmxnet.so needs (directly or through another of them), dependencies first and
globally: the linker then takes the loaded copy for every later request of the same soname
(MXNet's, Horovod's, cuDNN's own).

A GPU install (launch/install.sh with DISTFT_EXTRA=cu112) writes a .pth file into the venv that
calls `install_import_hook()` at interpreter start-up, so that any `import mxnet` in that venv
works: distft's, Horovod's build (it imports mxnet), a user's script. The hook costs nothing until
mxnet is imported. The driver (libcuda.so.1) is never among these: it comes with the machine."""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

# one line of Python that site.py runs at start-up (silent once distft is uninstalled)
PTH_LINE = ('import importlib.util as _u; _u.find_spec("distft") and '
            '__import__("distft.gpu.cudalibs").gpu.cudalibs.install_import_hook()\n')


def library_dirs() -> list:
    """site-packages/nvidia/*/lib of this interpreter (empty for a CPU install)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(d for base in spec.submodule_search_locations for d in glob.glob(os.path.join(base, "*", "lib"))
                  if os.path.isdir(d))


def index(dirs=None) -> dict:
    """soname -> path of every shared library in those folders (file name = soname there)."""
    found = {}
    for d in library_dirs() if dirs is None else dirs:
        for path in sorted(glob.glob(os.path.join(d, "lib*.so*"))):
            found.setdefault(os.path.basename(path), path)
    return found


def mxnet_library():
    """Path of the installed libmxnet.so, found without importing mxnet (None: not installed)."""
    spec = importlib.util.find_spec("mxnet")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "libmxnet.so")
    return path if os.path.isfile(path) else None


def load_order(roots, available: dict, needed_of) -> list:
    """Paths of the libraries in `available` that `roots` (sonames) need, directly or through each
    other, each after the ones it needs. `needed_of(path)` gives a library's DT_NEEDED sonames."""
    order, seen = [], set()

    def visit(soname):
        if soname in seen or soname not in available:
            return
        seen.add(soname)
        for dep in needed_of(available[soname]):
            visit(dep)
        order.append(available[soname])

    for root in roots:
        visit(root)
    return order


_loaded: list = []


def preload(library=None) -> list:
    """Load what `library` (default: the installed libmxnet.so) needs from the nvidia wheels.
    Returns the paths loaded; nothing for a CPU install. Loading twice is harmless."""
    import ctypes

    from distft.gpu import elffile  # here, not at the top: the start-up hook stays an import of this file

    library = library or mxnet_library()
    available = index()
    if not library or not available:
        return []
    order = load_order(elffile.needed(library), available, elffile.needed)
    for path in order:
        _loaded.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
    return order


class _PreloadBeforeMxnet:
    """A meta path finder that finds nothing: on the first `import mxnet` it preloads the CUDA
    libraries, removes itself, and lets the normal finders import mxnet."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mxnet":
            uninstall_import_hook()
            try:
                preload()
            except OSError:
                pass  # mxnet's own import then names the library that is missing
        return None


def install_import_hook() -> None:
    if not any(isinstance(f, _PreloadBeforeMxnet) for f in sys.meta_path):
        sys.meta_path.insert(0, _PreloadBeforeMxnet())


def uninstall_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PreloadBeforeMxnet)]
