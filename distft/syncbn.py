"""Synchronized BatchNorm over Horovod ranks.

Forward normalises with the statistics of the global batch (sums allreduced over ranks, two
passes: mean, then squared deviations). Backward is the exact gradient through those global
statistics: dx = gamma/sigma * (dy - mean_g(dy) - xhat * mean_g(dy*xhat)), the means taken over
the global batch. gamma/beta gradients stay local sums; the trainer's allreduce averages them
like every other gradient, which matches one process with the union batch.

Horovod's allreduce is not differentiable, so the layer is an mx.autograd.Function and runs
imperatively (it is never hybridized).
"""
from __future__ import annotations

import itertools

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import nn

_calls = itertools.count()


class _SyncBNFunction(autograd.Function):
    def __init__(self, world, name: str, eps: float, momentum: float, fix_gamma: bool,
                 running_mean, running_var):
        super().__init__()
        self.world, self.name, self.eps, self.momentum = world, name, eps, momentum
        self.fix_gamma = fix_gamma
        self.running_mean, self.running_var = running_mean, running_var

    def _sum(self, arr, tag):
        self.world.allreduce_([arr], name=f"{self.name}.{tag}", average=False)
        return arr

    def forward(self, x, gamma, beta):
        channels = x.shape[1]
        axes = (0, 2, 3) if x.ndim == 4 else tuple(a for a in range(x.ndim) if a != 1)
        bshape = (1, channels) + (1,) * (x.ndim - 2)
        count = x.size // channels
        totals = self._sum(mx.nd.concat(x.sum(axis=axes), mx.nd.array([count], ctx=x.context,
                                                                      dtype=x.dtype), dim=0), "sum")
        n = totals[channels:].asscalar()
        mean = totals[:channels] / n
        centred = mx.nd.broadcast_sub(x, mean.reshape(bshape))
        var = self._sum(mx.nd.square(centred).sum(axis=axes), "sqdev") / n
        inv_std = 1.0 / mx.nd.sqrt(var + self.eps)
        xhat = mx.nd.broadcast_mul(centred, inv_std.reshape(bshape))
        g = mx.nd.ones_like(gamma) if self.fix_gamma else gamma
        y = mx.nd.broadcast_add(mx.nd.broadcast_mul(xhat, g.reshape(bshape)), beta.reshape(bshape))
        # the same update MXNet's BatchNorm makes (biased batch variance)
        m = self.momentum
        self.running_mean[:] = self.running_mean * m + mean * (1 - m)
        self.running_var[:] = self.running_var * m + var * (1 - m)
        self.save_for_backward(xhat, g, inv_std, n, axes, bshape)
        y.wait_to_read()  # see backward
        return y

    def backward(self, dy):
        xhat, g, inv_std, n, axes, bshape = self.saved_tensors
        channels = dy.shape[1]
        local_dbeta = dy.sum(axis=axes)
        local_dgamma = (dy * xhat).sum(axis=axes)
        totals = self._sum(mx.nd.concat(local_dbeta, local_dgamma, dim=0), "grad")
        mean_dy = (totals[:channels] / n).reshape(bshape)
        mean_dy_xhat = (totals[channels:] / n).reshape(bshape)
        scale = (g * inv_std).reshape(bshape)
        dx = mx.nd.broadcast_mul(
            mx.nd.broadcast_sub(mx.nd.broadcast_sub(dy, mean_dy), mx.nd.broadcast_mul(xhat, mean_dy_xhat)),
            scale)
        dgamma = mx.nd.zeros_like(local_dgamma) if self.fix_gamma else local_dgamma
        # MXNet runs this inside an engine op and copies the results into buffers it owns once
        # we return; it counts the op done at return. With a cached (static-memory) graph
        # downstream, results still queued behind the allreduce would be read before they are
        # written: finish them here.
        for arr in (dx, dgamma, local_dbeta):
            arr.wait_to_read()
        return dx, dgamma, local_dbeta


class SyncBatchNorm(nn.BatchNorm):
    """A BatchNorm synchronized across ranks while training; plain BatchNorm in inference.

    Made by `convert`, which re-classes an existing layer in place: its parameters, names and
    registration stay exactly as they were (a checkpoint of it is a plain BatchNorm's)."""

    _world = None
    _layer_name = ""

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        if not autograd.is_training() or self._kwargs["use_global_stats"] or self._world is None:
            return super().hybrid_forward(F, x, gamma, beta, running_mean, running_var)
        if np.dtype(x.dtype) != np.float32:
            # mixed precision (train.precision: amp): statistics are summed in float32
            x = mx.nd.amp_cast(x, dtype="float32")
        fn = _SyncBNFunction(self._world, f"distft.syncbn.{self._layer_name}.{next(_calls)}",
                             self._kwargs["eps"], self._kwargs["momentum"], self._kwargs["fix_gamma"],
                             running_mean, running_var)
        return fn(x, gamma, beta)

    def hybridize(self, active=True, **kwargs):
        super().hybridize(False)  # its allreduce cannot live inside a cached graph


def convert(net, bn_paths: list[str], world) -> int:
    """Make the BatchNorm layers at `bn_paths` synchronized. Returns how many changed."""
    from .model import find_block

    count = 0
    for path in bn_paths:
        bn = find_block(net, path)
        if bn._kwargs.get("axis", 1) != 1:  # noqa: SLF001
            raise ValueError(f"{path}: synchronized BatchNorm supports axis=1 only")
        if not isinstance(bn, SyncBatchNorm):
            bn.__class__ = SyncBatchNorm
            count += 1
        bn._world, bn._layer_name = world, path  # noqa: SLF001
    return count


def is_sync(block) -> bool:
    return isinstance(block, SyncBatchNorm)
