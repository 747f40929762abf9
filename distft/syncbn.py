"""Synchronized BatchNorm over Horovod ranks.

Forward normalises with the statistics of the global batch; backward is the exact gradient
through them: dx = gamma/sigma * (dy - mean_g(dy) - xhat * mean_g(dy*xhat)), the means taken over
the global batch. gamma/beta gradients stay local sums; the trainer's allreduce averages them like
every other gradient, which matches one process with the union batch.

Cost model: one allreduce per layer forward (shifted sum, shifted sum of squares and the count,
in one buffer, float64 but under AMP) and one per layer backward (both reductions in one
buffer), under stable per-layer names so Horovod's response cache and fusion work from the
second step on. The main thread never waits here: Horovod's MXNet ops are asynchronous engine
operations, so the rest of the step (and the next batch's frozen prefix) is queued while an
exchange runs. Only backward,
which MXNet runs on its custom-operator thread, waits for its own results before it returns.

Two engine-ordering rules keep that deadlock-free and correct:
- backward runs later, on MXNet's custom-operator thread, after the main thread may already
  have queued the optimizer update that writes gamma. A read of gamma pushed from backward would
  queue behind that update, which waits for this very backward's gradients: a cycle (the hang
  that once forced the gradient exchange to be waited for with a synchronized BN). So backward
  reads only arrays made in forward (`scale` = gamma / sigma, the statistics), never a
  parameter, and touches no array that the next forward writes (`_Kernels`);
- one name is never in flight twice: a layer's forward exchange reads the running mean (its
  shift) that the previous forward wrote after its own exchange, and each backward exchange is
  queued after the layer's previous one (`_after`).

Horovod's allreduce is not differentiable, so the layer is an mx.autograd.Function: it is never
part of the network's cached graph and its exchanges are called imperatively; only the
per-channel stretches between them run as small cached graphs of their own (`_Fused`).
"""
from __future__ import annotations

import time

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import nn

from . import faults, precision


def running_var_sample(var, count, device_type: str, F=mx.nd):
    """The variance a BatchNorm of MXNet on `device_type` folds into its running variance: the
    biased batch variance on CPU (MXNet's own and oneDNN kernels), the unbiased one on GPU with
    cuDNN (MXNet's choice there for 4-D input unless cudnn_off; its own CUDA kernel, used
    otherwise, folds the biased one: not handled). `count` is the global batch's values per
    channel. The GPU rule is from cuDNN's documentation and has not run."""
    if device_type == "gpu":
        return F.broadcast_mul(var, F.broadcast_div(count, F.maximum(count - 1, F.ones_like(count))))
    return var


def _after(arr, earlier, F=mx.nd):
    """`arr` unchanged, but computed only once `earlier` is (0 * a finite 0/1 flag: NaN or Inf
    in `earlier` cannot leak into `arr`)."""
    if earlier is None:
        return arr
    first = F.slice_axis(earlier, axis=0, begin=0, end=1)
    return F.broadcast_add(arr, F.broadcast_equal(first, first) * 0)


class _Fused(nn.HybridBlock):
    """One stretch of the layer as one cached graph: one Python call and one engine operation
    where imperative code makes a dozen. Each of those costs tens of microseconds of Python and
    a hand-off to the engine's worker, and with a layer's few thousand values that, not the
    arithmetic, was the layer's cost (measured with distft.syncbench)."""

    def __init__(self, fn, **constants):
        super().__init__()
        self._fn, self._constants = fn, constants
        self.hybridize(static_alloc=True, static_shape=True)

    def hybrid_forward(self, F, *arrays):
        return self._fn(F, *arrays, **self._constants)


# MXNet's own BatchNorm kernel does every pass over the data: it is several times faster on CPU
# than generic reductions over (N, H, W) and broadcast arithmetic. Used three ways: in training
# mode for per-channel means (output_mean_var), with given statistics to normalise, and with
# statistics (0, 1 - eps) as a per-channel affine map x * scale + shift.

def _channel_stats(F, x, ones, zeros, scratch_mean, scratch_var, eps):
    """(mean, 1 / sqrt(var + eps)) per channel, of this rank's batch."""
    _, mean, inv_std = F.BatchNorm(x, ones, zeros, scratch_mean, scratch_var, eps=eps, fix_gamma=False,
                                   output_mean_var=True)
    return mean, inv_std


def _affine(F, x, scale, shift, zeros, one_less_eps, eps):
    return F.BatchNorm(x, scale, shift, zeros, one_less_eps, eps=eps, fix_gamma=False, use_global_stats=True)


def _local_stats(F, x, shift, count, ones, zeros, scratch_mean, scratch_var, eps, wide):
    """This rank's contribution to the statistics exchange: per channel, the sum of (x - shift)
    and of (x - shift)^2, then the count, in `wide` (float64; float32 under AMP, whose casts take
    no float64). Shifted by the running mean (the same on every rank), the ranks' statistics
    combine with less of the cancellation of E[x^2] - E[x]^2; float64 removes the rest, for a
    batch whose mean is far from the running mean against its spread (a channel at 10 with
    spread 0.01: its variance 3% off in float32). 2C+1 values: the extra bytes are nothing on
    the wire."""
    mean, inv_std = _channel_stats(F, x, ones, zeros, scratch_mean, scratch_var, eps)
    offset = F.cast(mean, dtype=wide) - F.cast(shift, dtype=wide)
    var = F.cast(1.0 / F.square(inv_std) - eps, dtype=wide)  # this rank's own: no cancellation
    count = F.cast(count, dtype=wide)
    return F.concat(F.broadcast_mul(offset, count), F.broadcast_mul(var + F.square(offset), count), count, dim=0)


def _normalise(F, x, gamma, beta, totals, running_mean, running_var, zeros, one_less_eps, channels, eps, momentum,
               device_type, wide):
    """y from the global statistics in `totals` (of type `wide`); what backward needs; the new
    running statistics."""
    n_wide = F.slice_axis(totals, axis=0, begin=2 * channels, end=2 * channels + 1)
    mean_offset = F.broadcast_div(F.slice_axis(totals, axis=0, begin=0, end=channels), n_wide)
    second = F.broadcast_div(F.slice_axis(totals, axis=0, begin=channels, end=2 * channels), n_wide)
    var = F.cast(F.relu(second - F.square(mean_offset)), dtype="float32")
    mean = F.cast(F.cast(running_mean, dtype=wide) + mean_offset, dtype="float32")  # the shift of _local_stats
    n = F.cast(n_wide, dtype="float32")
    scale = gamma * F.rsqrt(var + eps)  # what backward needs of gamma, taken now (see the module's doc)
    y = _affine(F, x, scale, beta - mean * scale, zeros, one_less_eps, eps)
    sample = running_var_sample(var, n, device_type, F)
    return (y, mean, var, n, scale, running_mean * momentum + mean * (1 - momentum),
            running_var * momentum + sample * (1 - momentum))


def _local_grads(F, dy, x, mean, var, scale, earlier, count, ones, zeros, no_shift, one_less_eps, s0, s1, s2, s3,
                 eps):
    """This rank's sums of dy (dbeta) and of dy * xhat (dgamma), packed for the exchange (queued
    after the layer's previous one: `earlier`), and the part of dx with the statistics fixed."""
    xhat = F.BatchNorm(x, ones, zeros, mean, var, eps=eps, fix_gamma=False, use_global_stats=True)
    mean_dy, _ = _channel_stats(F, dy, ones, zeros, s0, s1, eps)
    mean_dy_xhat, _ = _channel_stats(F, dy * xhat, ones, zeros, s2, s3, eps)
    dbeta, dgamma = F.broadcast_mul(mean_dy, count), F.broadcast_mul(mean_dy_xhat, count)
    dx_fixed = _affine(F, dy, scale, no_shift, zeros, one_less_eps, eps)
    return _after(F.concat(dbeta, dgamma, dim=0), earlier, F), dx_fixed, dgamma, dbeta


def _input_grad(F, dx_fixed, x, totals, n, mean, var, scale, zeros, one_less_eps, channels, eps):
    """dx = dx_fixed - scale * (mean(dy) + xhat * mean(dy * xhat)), the means over the global
    batch: the terms through the global statistics, as a per-channel affine map of x."""
    inv_std = F.rsqrt(var + eps)
    mean_dy = F.broadcast_div(F.slice_axis(totals, axis=0, begin=0, end=channels), n)
    slope = scale * inv_std * F.broadcast_div(F.slice_axis(totals, axis=0, begin=channels, end=2 * channels), n)
    return dx_fixed + _affine(F, x, -slope, slope * mean - scale * mean_dy, zeros, one_less_eps, eps)


class _Kernels:
    """One layer's fused stretches, for one input shape and device, each with constant arrays
    of its own. The BatchNorm kernel writes its moving statistics even when it only reads them,
    so an array given to two stretches orders them on the engine; shared between forward and
    backward, it would queue a backward behind the next step's forward (see the module's doc)."""

    def __init__(self, channels: int, count: int, eps: float, momentum: float, ctx):
        def arr(value, size=channels):
            return mx.nd.full((size,), value, ctx=ctx)

        # moving statistics of the statistics-only BatchNorm calls: written, never used
        wide = "float32" if precision.amp_enabled() else "float64"
        self.local_stats = _Fused(_local_stats, eps=eps, wide=wide)
        self.local_stats_args = (arr(count, 1), arr(1.0), arr(0.0), arr(0.0), arr(1.0))
        self.normalise = _Fused(_normalise, channels=channels, eps=eps, momentum=momentum,
                                device_type=ctx.device_type, wide=wide)
        self.normalise_args = (arr(0.0), arr(1.0 - eps))
        self.no_earlier = arr(0.0, 2 * channels)
        self.local_grads = _Fused(_local_grads, eps=eps)
        self.local_grads_args = (arr(count, 1), arr(1.0), arr(0.0), arr(0.0), arr(1.0 - eps),
                                 arr(0.0), arr(1.0), arr(0.0), arr(1.0))
        self.input_grad = _Fused(_input_grad, channels=channels, eps=eps)
        self.input_grad_args = (arr(0.0), arr(1.0 - eps))
        self.ones = arr(1.0)  # gamma, with fix_gamma


class _SyncBNFunction(autograd.Function):
    def __init__(self, layer: "SyncBatchNorm", running_mean, running_var):
        super().__init__()
        self.layer = layer
        self.running_mean, self.running_var = running_mean, running_var

    def forward(self, x, gamma_beta):
        layer = self.layer
        k = layer._kernels_for(x)  # noqa: SLF001
        channels = x.shape[1]
        gamma, beta = gamma_beta[:channels], gamma_beta[channels:]
        gamma = k.ones if layer._kwargs["fix_gamma"] else gamma  # noqa: SLF001
        # the running mean is read here and written below, after the exchange: the next call's
        # exchange (the same name) cannot start before this one has finished
        totals = k.local_stats(x, self.running_mean, *k.local_stats_args)
        layer._world.allreduce_([totals], name=f"distft.syncbn.{layer._layer_name}.stats",  # noqa: SLF001
                                average=False)
        y, mean, var, n, scale, running_mean, running_var = k.normalise(
            x, gamma, beta, totals, self.running_mean, self.running_var, *k.normalise_args)
        self.running_mean[:] = running_mean
        self.running_var[:] = running_var
        self.save_for_backward(x, mean, var, n, scale)
        return y

    def backward(self, dy):
        delay = faults.syncbn_backward_delay()
        if delay:
            time.sleep(delay)
        x, mean, var, n, scale = self.saved_tensors
        layer = self.layer
        k = layer._kernels_for(x)  # noqa: SLF001
        earlier = layer._last_grad_totals  # noqa: SLF001
        totals, dx_fixed, dgamma, dbeta = k.local_grads(dy, x, mean, var, scale,
                                                        k.no_earlier if earlier is None else earlier,
                                                        *k.local_grads_args)
        layer._world.allreduce_([totals], name=f"distft.syncbn.{layer._layer_name}.grad",  # noqa: SLF001
                                average=False)
        layer._last_grad_totals = totals  # noqa: SLF001
        dx = k.input_grad(dx_fixed, x, totals, n, mean, var, scale, *k.input_grad_args)
        if layer._kwargs["fix_gamma"]:  # noqa: SLF001
            dgamma = mx.nd.zeros_like(dgamma)
        # MXNet 1.9.1 takes the values we return as final once this callback returns: left
        # queued behind the exchange, they are read unwritten (non-finite gradients at the
        # second step, measured). This waits on the custom-operator thread only; the main
        # thread is already queueing the rest of the step.
        dgamma_beta = mx.nd.concat(dgamma, dbeta, dim=0)
        for arr in (dx, dgamma_beta):
            arr.wait_to_read()
        return dx, dgamma_beta


class SyncBatchNorm(nn.BatchNorm):
    """A BatchNorm synchronized across ranks while training; plain BatchNorm in inference.

    Made by `convert`, which re-classes an existing layer in place: its parameters, names and
    registration stay exactly as they were (a checkpoint of it is a plain BatchNorm's)."""

    _world = None
    _layer_name = ""
    _last_grad_totals = None
    _kernels = None

    def _kernels_for(self, x) -> _Kernels:
        """This layer's fused arithmetic for x's shape and device (not child blocks: the
        network's hybridize must not reach them)."""
        key = (x.shape, x.context)
        if self._kernels is None:
            self._kernels = {}
        if key not in self._kernels:
            self._kernels[key] = _Kernels(x.shape[1], x.size // x.shape[1], self._kwargs["eps"],
                                          self._kwargs["momentum"], x.context)
        return self._kernels[key]

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        if not autograd.is_training() or self._kwargs["use_global_stats"] or self._world is None:
            return super().hybrid_forward(F, x, gamma, beta, running_mean, running_var)
        if np.dtype(x.dtype) != np.float32:
            # mixed precision (train.precision: amp): statistics are summed in float32
            x = mx.nd.amp_cast(x, dtype="float32")
        # gamma and beta enter as one recorded array: MXNet 1.9.1's Function.backward writes
        # nothing for an input whose gradient request is 'add' (gradient accumulation over
        # micro-batches) and nothing after an input whose request is 'null'. An intermediate
        # array's request is 'write'; autograd then hands each parameter its share under its own
        # request. x comes first: in training it always needs its gradient (FreezePlan.input_grad).
        return _SyncBNFunction(self, running_mean, running_var)(x, F.concat(gamma, beta, dim=0))

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
