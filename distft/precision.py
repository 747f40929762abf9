"""Mixed precision, the MXNet seam for it (`train.precision: amp`).

MXNet's AMP (`mxnet.contrib.amp`) rewrites operators process-wide so that convolutions and
dense layers run in the low-precision type and numerically touchy ones (softmax, norms, sums)
stay float32; parameters, optimizer state, gradients and checkpoints stay float32. The type
follows the hardware: float16 on GPU (Tensor Cores), with dynamic loss scaling; bfloat16 on CPU
(oneDNN, AVX-512), which has float32's exponent range and needs no loss scaling. It must be
switched on before the model is built, once per process.
"""
from __future__ import annotations

import functools

import mxnet as mx
import numpy as np

from distft.errors import ConfigError

_enabled: dict = {}


def low_dtype(ctx) -> str:
    return "float16" if ctx.device_type == "gpu" else "bfloat16"


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        line = ""
    return frozenset(line.split(":", 1)[-1].split())


def enable(precision: str, ctx) -> str:
    """Switch AMP on for this process if `precision` asks for it; returns the compute type."""
    if precision == "float32":
        return "float32"
    dtype = low_dtype(ctx)
    if dtype == "bfloat16":
        if not mx.runtime.Features().is_enabled("MKLDNN"):
            raise ConfigError("train.precision: amp on CPU needs MXNet's oneDNN (MKLDNN) build for bfloat16")
        if "avx512bw" not in cpu_flags():
            raise ConfigError("train.precision: amp on CPU needs bfloat16 kernels (AVX-512); this CPU has no "
                              "avx512bw: use train.precision: float32")
    if _enabled.get("dtype") not in (None, dtype):
        raise ConfigError(f"train.precision: AMP is already on in this process with {_enabled['dtype']}")
    if not _enabled:
        from mxnet.contrib import amp

        amp.init(target_dtype=dtype)
        _enabled["dtype"] = dtype
    return dtype


def amp_enabled() -> bool:
    """Whether AMP rewrites this process's operators (then graphs take no float64: its casts,
    on oneDNN, fail on it)."""
    return bool(_enabled)


def to_float32(arr):
    """A float32 view of an AMP output (bfloat16 arrays cannot be read into numpy as numbers)."""
    return arr if np.dtype(arr.dtype) == np.float32 else mx.nd.amp_cast(arr, dtype="float32")


class LossScale:
    """Dynamic loss scaling for float16: the loss is multiplied by `scale` before backward; a
    step whose (allreduced) gradients overflow is skipped and the scale halved; after `window`
    good steps in a row it doubles. For float32 and bfloat16 the scale stays 1."""

    def __init__(self, dtype: str, initial: float = 2.0 ** 16, window: int = 2000, ceiling: float = 2.0 ** 24):
        self.dynamic = dtype == "float16"
        self.scale = initial if self.dynamic else 1.0
        self.window, self.ceiling = window, ceiling
        self.good = 0
        self.overflows = 0

    def overflowed(self) -> None:
        self.overflows += 1
        self.good = 0
        self.scale = max(self.scale / 2.0, 1.0)

    def stepped(self) -> None:
        if not self.dynamic:
            return
        self.good += 1
        if self.good >= self.window:
            self.good = 0
            self.scale = min(self.scale * 2.0, self.ceiling)

    def state(self) -> dict:
        return {"scale": self.scale, "good": self.good, "overflows": self.overflows}

    def load(self, doc: dict) -> None:
        if self.dynamic and doc:
            self.scale = float(doc.get("scale", self.scale))
            self.good = int(doc.get("good", 0))
            self.overflows = int(doc.get("overflows", 0))
