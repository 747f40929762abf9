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


def _affine(x, scale, shift, eps: float):
    """x * scale + shift per channel, in one pass: MXNet's BatchNorm with fixed statistics
    (mean 0, variance 1 - eps), far faster on CPU than a broadcast multiply and add."""
    zero = mx.nd.zeros_like(scale)
    return mx.nd.BatchNorm(x, scale, shift, zero, mx.nd.ones_like(scale) * (1.0 - eps), eps=eps,
                           fix_gamma=False, use_global_stats=True)


class _SyncBNFunction(autograd.Function):
    """MXNet's own BatchNorm kernel does the heavy passes over the data (per-channel statistics,
    normalisation, and in backward the sums of dy and dy * xhat); this class adds the exchange and
    the gradient through the global statistics. Generic reductions over (N, H, W) and broadcast
    arithmetic are several times slower on CPU (measured by `distft.syncbench`)."""

    def __init__(self, layer: "SyncBatchNorm", running_mean, running_var):
        super().__init__()
        self.layer = layer
        self.running_mean, self.running_var = running_mean, running_var

    def forward(self, x, gamma, beta):
        layer = self.layer
        eps, momentum = layer._kwargs["eps"], layer._kwargs["momentum"]  # noqa: SLF001
        channels = x.shape[1]
        ones, zeros = mx.nd.ones((channels,), ctx=x.context), mx.nd.zeros((channels,), ctx=x.context)
        with autograd.train_mode():  # this rank's batch statistics (mean, 1/sqrt(var + eps))
            _, local_mean, inv_std = mx.nd.BatchNorm(x, ones, zeros, zeros.copy(), ones.copy(), eps=eps,
                                                     fix_gamma=False, output_mean_var=True)
        local_var = 1.0 / mx.nd.square(inv_std) - eps
        # shifted by the running mean (the same on every rank): the ranks' statistics combine
        # without the cancellation of E[x^2] - E[x]^2 when the mean is large against the spread
        shift = self.running_mean.copy()
        count = x.size // channels
        offset = local_mean - shift
        totals = mx.nd.concat(offset * count, (local_var + mx.nd.square(offset)) * count,
                              mx.nd.full((1,), count, ctx=x.context), dim=0)
        layer._world.allreduce_([totals], name=f"distft.syncbn.{layer._layer_name}.stats",  # noqa: SLF001
                                average=False)
        n = totals[2 * channels:]
        mean_offset = mx.nd.broadcast_div(totals[:channels], n)
        var = mx.nd.relu(mx.nd.broadcast_div(totals[channels:2 * channels], n) - mx.nd.square(mean_offset))
        mean = shift + mean_offset
        g = ones if layer._kwargs["fix_gamma"] else gamma.copy()  # noqa: SLF001  (see the module's doc)
        y = mx.nd.BatchNorm(x, g, beta, mean, var, eps=eps, fix_gamma=False, use_global_stats=True)
        self.running_mean[:] = self.running_mean * momentum + mean * (1 - momentum)
        sample = running_var_sample(var, n, x.context.device_type)
        self.running_var[:] = self.running_var * momentum + sample * (1 - momentum)
        self.save_for_backward(x, g, mean, var, n)
        return y

    def backward(self, dy):
        x, g, mean, var, n = self.saved_tensors
        layer = self.layer
        eps = layer._kwargs["eps"]  # noqa: SLF001
        channels = dy.shape[1]
        # MXNet's BatchNorm backward with the statistics held fixed: dx without the terms
        # through the statistics, and this rank's sums of dy (dbeta) and dy * xhat (dgamma)
        xd, gd, bd = x.detach(), g.detach(), mx.nd.zeros_like(g)
        for arr in (xd, gd, bd):
            arr.attach_grad()
        with autograd.record():
            y = mx.nd.BatchNorm(xd, gd, bd, mean, var, eps=eps, fix_gamma=False, use_global_stats=True)
        y.backward(dy)
        local_dbeta, local_dgamma, dx_fixed = bd.grad, gd.grad, xd.grad
        totals = _after(mx.nd.concat(local_dbeta, local_dgamma, dim=0), layer._last_grad_totals)  # noqa: SLF001
        layer._world.allreduce_([totals], name=f"distft.syncbn.{layer._layer_name}.grad",  # noqa: SLF001
                                average=False)
        layer._last_grad_totals = totals  # noqa: SLF001
        # the terms through the global statistics: dx -= scale * (mean(dy) + xhat * mean(dy * xhat))
        inv_std = mx.nd.rsqrt(var + eps)
        scale = g * inv_std
        mean_dy = mx.nd.broadcast_div(totals[:channels], n)
        slope = scale * inv_std * mx.nd.broadcast_div(totals[channels:], n)
        dx = dx_fixed - _affine(x, slope, scale * mean_dy - slope * mean, eps)
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
