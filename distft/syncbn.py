"""Synchronized BatchNorm over Horovod ranks.

Forward normalises with the statistics of the global batch; backward is the exact gradient
through them: dx = gamma/sigma * (dy - mean_g(dy) - xhat * mean_g(dy*xhat)), the means taken over
the global batch. gamma/beta gradients stay local sums; the trainer's allreduce averages them like
every other gradient, which matches one process with the union batch.

Cost model: one allreduce per layer forward (shifted sum, shifted sum of squares and the count,
in one buffer) and one per layer backward (both reductions in one buffer), under stable
per-layer names so Horovod's response cache and fusion work from the second step on. The main
thread never waits here: Horovod's MXNet ops are asynchronous engine operations, so the rest of
the step (and the next batch's frozen prefix) is queued while an exchange runs. Only backward,
which MXNet runs on its custom-operator thread, waits for its own results before it returns.

Two engine-ordering rules keep that deadlock-free and correct:
- backward runs later, on MXNet's custom-operator thread, after the main thread may already
  have queued the optimizer update that writes gamma. A read of gamma pushed from backward would
  queue behind that update, which waits for this very backward's gradients: a cycle (the hang
  that once forced the gradient exchange to be waited for with a synchronized BN). So backward
  reads only arrays made in forward (`scale` = gamma / sigma, xhat), never a parameter;
- one name is never in flight twice: a layer's forward exchange reads the running mean (its
  shift) that the previous forward wrote after its own exchange, and each backward exchange is
  queued after the layer's previous one (`_after`).

Horovod's allreduce is not differentiable, so the layer is an mx.autograd.Function and runs
imperatively (it is never hybridized).
"""
from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import nn


def running_var_sample(var, count, device_type: str):
    """The variance a BatchNorm of MXNet on `device_type` folds into its running variance: the
    biased batch variance on CPU (MXNet's own and oneDNN kernels), the unbiased one on GPU
    (cuDNN, and MXNet's CUDA kernel). `count` is the global batch's values per channel."""
    if device_type == "gpu":
        return var * (count / mx.nd.maximum(count - 1, mx.nd.ones_like(count)))
    return var


def _after(arr, earlier):
    """`arr` unchanged, but queued on the engine only once `earlier` is computed (0 * a finite
    0/1 flag: NaN or Inf in `earlier` cannot leak into `arr`)."""
    if earlier is None:
        return arr
    flag = mx.nd.broadcast_equal(earlier[0:1], earlier[0:1])
    return mx.nd.broadcast_add(arr, flag * 0)


class _SyncBNFunction(autograd.Function):
    def __init__(self, layer: "SyncBatchNorm", running_mean, running_var):
        super().__init__()
        self.layer = layer
        self.running_mean, self.running_var = running_mean, running_var

    def forward(self, x, gamma, beta):
        layer = self.layer
        eps, momentum = layer._kwargs["eps"], layer._kwargs["momentum"]  # noqa: SLF001
        channels = x.shape[1]
        axes = tuple(a for a in range(x.ndim) if a != 1)
        bshape = (1, channels) + (1,) * (x.ndim - 2)
        # shifted by the running mean (the same on every rank): one pass, without the
        # cancellation of E[x^2] - E[x]^2 when the mean is large against the spread
        shift = self.running_mean.copy()
        centred = mx.nd.broadcast_sub(x, shift.reshape(bshape))
        count = mx.nd.full((1,), x.size // channels, ctx=x.context, dtype="float32")
        totals = mx.nd.concat(centred.sum(axis=axes), mx.nd.square(centred).sum(axis=axes), count, dim=0)
        layer._world.allreduce_([totals], name=f"distft.syncbn.{layer._layer_name}.stats",  # noqa: SLF001
                                average=False)
        n = totals[2 * channels:]
        mean_shifted = mx.nd.broadcast_div(totals[:channels], n)
        var = mx.nd.relu(mx.nd.broadcast_div(totals[channels:2 * channels], n) - mx.nd.square(mean_shifted))
        mean = shift + mean_shifted
        inv_std = mx.nd.rsqrt(var + eps)
        g = mx.nd.ones_like(gamma) if layer._kwargs["fix_gamma"] else gamma  # noqa: SLF001
        scale = g * inv_std  # what backward needs of gamma, taken now (see the module's doc)
        xhat = mx.nd.broadcast_mul(mx.nd.broadcast_sub(x, mean.reshape(bshape)), inv_std.reshape(bshape))
        y = mx.nd.broadcast_add(mx.nd.broadcast_mul(xhat, g.reshape(bshape)), beta.reshape(bshape))
        self.running_mean[:] = self.running_mean * momentum + mean * (1 - momentum)
        sample = running_var_sample(var, n, x.context.device_type)
        self.running_var[:] = self.running_var * momentum + sample * (1 - momentum)
        self.save_for_backward(xhat, scale, n, axes, bshape)
        return y

    def backward(self, dy):
        xhat, scale, n, axes, bshape = self.saved_tensors
        layer = self.layer
        channels = dy.shape[1]
        local_dbeta = dy.sum(axis=axes)
        local_dgamma = (dy * xhat).sum(axis=axes)
        totals = _after(mx.nd.concat(local_dbeta, local_dgamma, dim=0), layer._last_grad_totals)  # noqa: SLF001
        layer._world.allreduce_([totals], name=f"distft.syncbn.{layer._layer_name}.grad",  # noqa: SLF001
                                average=False)
        layer._last_grad_totals = totals  # noqa: SLF001
        mean_dy = mx.nd.broadcast_div(totals[:channels], n).reshape(bshape)
        mean_dy_xhat = mx.nd.broadcast_div(totals[channels:], n).reshape(bshape)
        dx = mx.nd.broadcast_mul(
            mx.nd.broadcast_sub(mx.nd.broadcast_sub(dy, mean_dy), mx.nd.broadcast_mul(xhat, mean_dy_xhat)),
            scale.reshape(bshape))
        dgamma = mx.nd.zeros_like(local_dgamma) if layer._kwargs["fix_gamma"] else local_dgamma  # noqa: SLF001
        # MXNet 1.9.1 takes the values we return as final once this callback returns: left
        # queued behind the exchange, they are read unwritten (non-finite gradients at the
        # second step, measured). This waits on the custom-operator thread only; the main
        # thread is already queueing the rest of the step.
        for arr in (dx, dgamma, local_dbeta):
            arr.wait_to_read()
        return dx, dgamma, local_dbeta


class SyncBatchNorm(nn.BatchNorm):
    """A BatchNorm synchronized across ranks while training; plain BatchNorm in inference.

    Made by `convert`, which re-classes an existing layer in place: its parameters, names and
    registration stay exactly as they were (a checkpoint of it is a plain BatchNorm's)."""

    _world = None
    _layer_name = ""
    _last_grad_totals = None

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        if not autograd.is_training() or self._kwargs["use_global_stats"] or self._world is None:
            return super().hybrid_forward(F, x, gamma, beta, running_mean, running_var)
        if np.dtype(x.dtype) != np.float32:
            # mixed precision (train.precision: amp): statistics are summed in float32
            x = mx.nd.amp_cast(x, dtype="float32")
        return _SyncBNFunction(self, running_mean, running_var)(x, gamma, beta)

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
