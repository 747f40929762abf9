"""The GPU probe: the driver and the GPUs this process can see, through the CUDA driver API
(libcuda.so.1, with ctypes). It honours CUDA_VISIBLE_DEVICES and numbers the GPUs as MXNet does
(mx.gpu(i)). With no driver library it reports no driver and no GPU, and it never imports MXNet,
so it answers before any framework or collective starts. `probe` is the seam tests replace."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass
from typing import Optional

DRIVER_SONAME = "libcuda.so.1"
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


@dataclass
class Gpu:
    index: int
    name: str
    capability: tuple  # (major, minor)
    memory_bytes: Optional[int]

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name})"


@dataclass
class Driver:
    library: str  # the file the loader opened, e.g. /usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05
    version: Optional[str]  # the driver's release, e.g. "535.104.05" (from the kernel module or the file name)
    cuda: Optional[str]  # the newest CUDA it serves, e.g. "12.2" (cuDriverGetVersion)
    error: Optional[str] = None  # why no GPU could be listed (cuInit's error), else None

    def to_json(self) -> dict:
        return {"library": self.library, "version": self.version, "cuda": self.cuda, "error": self.error}


def _loaded_path(lib) -> Optional[str]:
    """The file behind a loaded driver library, as the loader opened it (dladdr of its cuInit),
    so a stub on LD_LIBRARY_PATH shows as one."""
    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    info = DlInfo()
    try:
        address = ctypes.cast(lib.cuInit, ctypes.c_void_p).value
        if not ctypes.CDLL(None).dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
            return None
    except (AttributeError, OSError):
        return None
    return os.path.realpath(info.dli_fname.decode()) if info.dli_fname else None


def _kernel_module_version() -> Optional[str]:
    try:
        with open("/proc/driver/nvidia/version") as fh:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", fh.read())
    except OSError:
        return None
    return found.group(1) if found else None


def _error_name(cuda, code: int) -> str:
    name = ctypes.c_char_p()
    try:
        if cuda.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
            return f"{name.value.decode()} ({code})"
    except AttributeError:
        pass
    return f"error {code}"


def probe() -> tuple:
    """(Driver or None, [Gpu, ...]): None and [] when there is no driver library."""
    try:
        cuda = ctypes.CDLL(DRIVER_SONAME)
    except OSError:
        return None, []
    path = _loaded_path(cuda) or ctypes.util.find_library("cuda") or DRIVER_SONAME
    found = re.search(r"libcuda\.so\.(\d+\.\d+(?:\.\d+)?)$", path)
    driver = Driver(library=path, version=_kernel_module_version() or (found.group(1) if found else None), cuda=None)
    try:
        version = ctypes.c_int()
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
            driver.cuda = f"{version.value // 1000}.{version.value % 1000 // 10}"
        code = cuda.cuInit(0)
        if code != 0:
            driver.error = f"cuInit: {_error_name(cuda, code)}"
            return driver, []
        count = ctypes.c_int()
        code = cuda.cuDeviceGetCount(ctypes.byref(count))
        if code != 0:
            driver.error = f"cuDeviceGetCount: {_error_name(cuda, code)}"
            return driver, []
        gpus = []
        for index in range(count.value):
            device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
            name, memory = ctypes.create_string_buffer(256), ctypes.c_size_t()
            cuda.cuDeviceGet(ctypes.byref(device), index)
            cuda.cuDeviceGetName(name, len(name), device)
            cuda.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, device)
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, device)
            total = cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), device) == 0
            gpus.append(Gpu(index, name.value.decode(errors="replace"), (major.value, minor.value),
                            memory.value if total else None))
        return driver, gpus
    except AttributeError as exc:  # a library that is not the driver (a stub) lacks the entry points
        driver.error = f"{path} has no {exc.args[0].split(':')[-1].strip()}: not a CUDA driver"
        return driver, []
