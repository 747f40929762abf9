"""Which input sizes a network takes, found by trying shapes: symbolic shape inference of one
image through a freshly built network (the model zoo does not declare a minimum size, and the
layer that fails, a pooling window or a fixed 8x8 average pool, differs per family).

Symbolic, so that nothing is allocated: the check once ran a real forward pass of an
initialised network, and MXNet's memory pool kept what it had used: resnet50_v2 left every
rank of a training job about 240 MB larger for its whole run (measured with psutil around
`open_data`; 1.7 GB after a few sizes)."""
from __future__ import annotations

import contextlib
import functools
import io
from typing import Optional

import mxnet as mx
from mxnet.gluon.model_zoo import vision

from distft.errors import ModelError
from distft.models.gluon import model_names

LARGEST_TRIED = 1024


@functools.lru_cache(maxsize=None)
def fits(name: str, size: int) -> bool:
    net = vision.get_model(name, classes=2)
    # a failed shape inference prints its arguments to stdout before raising
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            _, out_shapes, _ = net(mx.sym.var("data")).infer_shape(data=(1, 3, size, size))
        except (mx.base.MXNetError, ValueError):
            return False
    return bool(out_shapes) and out_shapes[0] is not None


@functools.lru_cache(maxsize=None)
def smallest_size(name: str, failing: int = 8) -> Optional[int]:
    """The smallest square size above `failing` that the network takes, assuming every size
    above a working one works too: doubling until one fits, then a binary search. None if
    nothing up to LARGEST_TRIED fits."""
    low, high = failing, failing * 2  # low fails; high is tried
    while not fits(name, high):
        if high >= LARGEST_TRIED:
            return None
        low, high = high, min(high * 2, LARGEST_TRIED)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(name, mid):
            high = mid
        else:
            low = mid
    return high


def too_small(name: str, size: int) -> Optional[str]:
    """The error for a size below the network's smallest (None if that is not the problem)."""
    smallest = smallest_size(name, size)
    if smallest is not None and smallest > size:
        return f"model.image_size: {size} is too small for {name}; the smallest size it takes is {smallest}"
    return None


def require_fits(name: str, size: int) -> None:
    """Up front, before any data is read: a size the network cannot take is a one-line error
    naming the smallest that works. Unknown names are left to the model's own check."""
    if name in model_names() and not fits(name, size):
        message = too_small(name, size)
        if message:
            raise ModelError(message)
