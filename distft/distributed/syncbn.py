"""Synchronized BatchNorm across ranks, at the cost of its exchanges.

Forward normalises with the statistics of the global batch; backward is the exact gradient
through them: dx = gamma/sigma * (dy - mean_g(dy) - xhat * mean_g(dy*xhat)), the means taken over
the global batch. gamma/beta gradients stay local sums; the trainer's allreduce averages them like
every other gradient, which matches one process with the union batch.

One exchange per layer forward (the shifted sum, the shifted sum of squares and the count) and
one backward (both gradient sums), each 2C+1 or 2C float64 values through the statistics
channel (`bnchannel`, `bnexchange`), staged through the host whatever the device. No backward
exchange where the layer's input needs no gradient (the first trainable BN after the frozen
prefix). Every pass over the data runs on MXNet's BatchNorm kernel, several times faster on
CPU than generic reductions; the per-channel arithmetic (2C values) runs in float64 numpy, in
microseconds, where float32 on the device cancelled (a channel at 10 with spread 0.01).

What a layer costs beyond MXNet's own BatchNorm, and what was taken out of it (measured with
distft.bench.syncbench, one process, 8x512x2x2; `distft bench` prints the 2-rank figures):
- MXNet's autograd.Function: its per-call ctypes callbacks, and a copy of every returned
  gradient into the engine's buffer. `_Recorded` registers the layer with
  MXCustomFunctionRecord under two callbacks made once, and backward writes each gradient into
  its buffer directly, with the request MXNet gives (write, add, or null: nothing to compute);
- a queue built for gradients: Horovod's cycle and negotiation per exchange (`bnchannel`);
- a dozen small imperative ops per pass. Forward is now three kernel calls around a host step,
  backward two cached graphs around one.

Engine-order rules (a backward runs later, on MXNet's custom-operator thread, after the main
thread may have queued the update and the next forward):
- backward reads only arrays made for it (x, a per-call staging array, its own constants), never
  a parameter: a read of gamma from backward would queue behind the update that waits for this
  backward (a cycle: the overlap hang of an earlier version);
- the staging array is new for each call, so no later forward writes what a backward reads.
"""
from __future__ import annotations

import ctypes
import itertools
import time
import traceback
from ctypes import CFUNCTYPE, POINTER, c_int, c_void_p

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.base import MXNetError
from mxnet.gluon import nn

from distft import faults
from distft.distributed import bnchannel
from distft.models.gluon import batchnorm_setting, find_block


def running_var_sample(var, count, device_type: str):
    """The variance a BatchNorm of MXNet on `device_type` folds into its running variance: the
    biased batch variance on CPU (MXNet's own and oneDNN kernels), the unbiased one on GPU with
    cuDNN (MXNet's choice there for 4-D input unless cudnn_off; its own CUDA kernel, used
    otherwise, folds the biased one: not handled). `count` is the global batch's values per
    channel. The GPU rule is from cuDNN's documentation and has not run."""
    if device_type == "gpu":
        return var * (count / max(count - 1.0, 1.0))
    return var


def recorded(arr) -> bool:
    """Whether autograd recorded `arr` (a trainable leaf or computed from one): only then does
    backward ask for its gradient."""
    try:
        autograd.get_symbol(arr)
        return True
    except MXNetError:
        return False


# --- an autograd node of our own ------------------------------------------------------------------

_BACKWARD = CFUNCTYPE(c_int, c_int, c_int, POINTER(c_void_p), POINTER(c_int), c_int, c_void_p)
_DELETE = CFUNCTYPE(c_int, c_void_p)
_live: dict = {}
_keys = itertools.count(1)


def _backward_entry(n_out, n_in, handles, reqs, is_train, key):
    try:
        node = _live[key]
        arrays = [mx.nd.NDArray(ctypes.cast(handles[i], mx.base.NDArrayHandle), writable=i >= n_out)
                  for i in range(n_out + n_in)]
        node.backward(arrays[:n_out], arrays[n_out:], [reqs[i] for i in range(n_in)])
        return True
    except Exception:  # noqa: BLE001 - MXNet reads a failed callback from its return value
        print(f"distft: synchronized BatchNorm backward failed:\n{traceback.format_exc()}", flush=True)
        return False


def _delete_entry(key):
    _live.pop(key, None)
    return True


_CALLBACKS = (_BACKWARD(_backward_entry), _DELETE(_delete_entry))  # made once, kept alive


class _Recorded:
    """A node of MXNet's autograd graph whose backward is `self.backward(out_grads, in_grads,
    reqs)`: it writes each input's gradient into MXNet's buffer itself (req 1/2 write, 3 add,
    0 nothing). MXNet's autograd.Function makes two ctypes callbacks per call and copies each
    returned gradient once more; it also writes nothing for an input after one that needs no
    gradient, and nothing for `add`."""

    def record(self, inputs: list, outputs: list) -> None:
        key = next(_keys)
        callbacks = ctypes.cast(mx.base.c_array(CFUNCTYPE(c_int), [ctypes.cast(c, CFUNCTYPE(c_int))
                                                                    for c in _CALLBACKS]),
                                POINTER(CFUNCTYPE(c_int)))
        contexts = ctypes.cast(mx.base.c_array(c_void_p, [key, key]), POINTER(c_void_p))
        self._callbacks = mx.base.MXCallbackList(c_int(2), callbacks, contexts)  # alive until deleted
        _live[key] = self
        mx.base.check_call(mx.base._LIB.MXCustomFunctionRecord(  # noqa: SLF001 - the C API of autograd.Function
            c_int(len(inputs)), mx.base.c_handle_array(inputs), c_int(len(outputs)),
            mx.base.c_handle_array(outputs), ctypes.byref(self._callbacks)))


def _settled(arrays) -> None:
    """Wait, on this custom-operator thread, until the gradients written here are computed.
    MXNet 1.9.1 treats them as final once the callback returns: left queued, they were read
    half-written (non-finite gradients within a few steps, measured with 2 ranks; the main
    thread is not held: it queues the rest of the step meanwhile)."""
    for arr in arrays:
        arr.wait_to_read()


# --- the kernels --------------------------------------------------------------------------------

_BN_BACKWARD = mx.base.OpHandle()
mx.base.check_call(mx.base._LIB.NNGetOpHandle(mx.base.c_str("_backward_BatchNorm"),  # noqa: SLF001
                                              ctypes.byref(_BN_BACKWARD)))


def _bn_backward(dy, x, gamma, mean, var, out: list, **attrs) -> None:
    """MXNet's BatchNorm backward kernel with the statistics given (use_global_stats): dy * gamma
    / sigma, sum(dy * xhat), sum(dy) in one pass. Not exposed to Python (a backward op has no
    shape inference of its own: `out` gives the shapes)."""
    from mxnet._ctypes.ndarray import _imperative_invoke

    keys = list(attrs)
    _imperative_invoke(_BN_BACKWARD.value, [dy, mean, var, x, gamma, gamma, mean, var], keys,
                       [str(attrs[k]) for k in keys], out, False, True)


class _Layer:
    """One layer's constants for one input shape and device. The BatchNorm kernel writes its
    moving statistics even where it only reads them (or ignores them: scratch), so forward and
    backward each have their own: shared, they would order a backward behind the next forward."""

    def __init__(self, channels: int, count: int, eps: float, ctx):
        def arr(value):
            return mx.nd.full((channels,), value, ctx=ctx)

        self.count = count
        self.stats_args = (arr(1.0), arr(0.0), arr(0.0), arr(1.0))  # forward: gamma, beta, scratch
        self.ones, self.zeros = arr(1.0), arr(0.0)  # backward
        # a per-channel affine map x * gamma + beta is a BatchNorm with statistics (0, 1 - eps)
        self.affine_args = (arr(0.0), arr(1.0 - eps))

    def normalised_args(self, mean, var) -> tuple:
        return self.ones, self.zeros, mean, var


class _SyncBN(_Recorded):
    def __init__(self, layer: "SyncBatchNorm", running_mean, running_var):
        self.layer, self.running_mean, self.running_var = layer, running_mean, running_var

    def __call__(self, x, gamma, beta):
        layer = self.layer
        c = x.shape[1]
        eps, momentum, fix_gamma = (batchnorm_setting(layer, k) for k in ("eps", "momentum", "fix_gamma"))
        k = layer.constants_for(x)
        # the inputs autograd recorded (a trainable leaf or computed from one): only they go into
        # the node. One that needs no gradient (the frozen prefix's output before the first
        # trainable BN) would get a buffer of no shape, which makes autograd's backward call
        # wait until this node's backward has run, on the main thread (a grid's heads then
        # could not exchange side by side, and the gradient exchange could not start early)
        self.inputs = [i for i, a in enumerate((x, gamma, beta)) if autograd.is_recording() and recorded(a)]
        recording = autograd.set_recording(False)
        try:
            # this rank's statistics (the kernel's pass over the data), to the host
            _, mean, inv_std = mx.nd.BatchNorm(x, *k.stats_args, eps=eps, fix_gamma=False, output_mean_var=True)
            mean, inv_std, rm, rv = bnchannel.to_host(mean, inv_std, self.running_mean, self.running_var)
            g = np.ones(c) if fix_gamma else bnchannel.to_host(gamma)[0]
            # moments about the running mean (the same on every rank), in float64: no cancellation
            count = float(k.count)
            offset = mean - rm
            local = np.concatenate([count * offset, count * (1.0 / np.square(inv_std) - eps + np.square(offset)),
                                    [count]])
            total, self.where = layer.exchanges.forward(layer.layer_key, local, 0 in self.inputs)
            n = total[-1]
            mean_offset = total[:c] / n
            var = np.maximum(total[c:2 * c] / n - np.square(mean_offset), 0.0)
            mean_g = rm + mean_offset
            self.n, self.scale = n, g / np.sqrt(var + eps)
            # global mean and variance, and gamma for backward (which must not read the parameter)
            staged = bnchannel.to_device(np.concatenate([mean_g, var, g]), x.context)
            self.mean, self.var, self.gamma = staged[:c], staged[c:2 * c], staged[2 * c:]
            y = mx.nd.BatchNorm(x, gamma, beta, self.mean, self.var, eps=eps, fix_gamma=fix_gamma,
                                use_global_stats=True)
            bnchannel.copy_into(self.running_mean, rm * momentum + mean_g * (1 - momentum))
            bnchannel.copy_into(self.running_var, rv * momentum + running_var_sample(var, n, x.context.device_type)
                                * (1 - momentum))
        finally:
            autograd.set_recording(recording)
        if self.inputs:
            self.x = x
            self.record([(x, gamma, beta)[i] for i in self.inputs], [y])
        return y

    def backward(self, out_grads: list, recorded_grads: list, recorded_reqs: list) -> None:
        delay = faults.syncbn_backward_delay()
        if delay:
            time.sleep(delay)
        in_grads, reqs = [None] * 3, [0] * 3  # for x, gamma, beta
        for i, g, r in zip(self.inputs, recorded_grads, recorded_reqs):
            in_grads[i], reqs[i] = g, r
        layer, (dy,), x = self.layer, out_grads, self.x
        c, eps = x.shape[1], batchnorm_setting(layer, "eps")
        # dx with the statistics held fixed, this rank's sum(dy * xhat) and sum(dy): one kernel
        # call, straight into MXNet's buffers where it asks for a write
        # (a buffer MXNet gives for an input that needs no gradient may hold nothing: shapes from x)
        shapes = (x.shape, (c,), (c,))
        out = [g if r in (1, 2) else mx.nd.empty(shape, ctx=x.context) for g, r, shape in zip(in_grads, reqs, shapes)]
        _bn_backward(dy, x, self.gamma, self.mean, self.var, out, eps=eps, use_global_stats=True,
                     fix_gamma=batchnorm_setting(layer, "fix_gamma"))
        written = out[1:]
        for i in (1, 2):
            if reqs[i] == 3:
                in_grads[i] += out[i]
                written.append(in_grads[i])
        if self.where is None:  # forward found the input needs no gradient: nothing to exchange
            _settled(written)
            return
        if not reqs[0]:
            layer.exchanges.backward(self.where, None)  # every rank skips alike
            _settled(written)
            return
        # everything that reads x is queued now, before this thread waits for the exchange:
        # queued after it, it could come behind the next step's forward, which may already
        # rewrite x (a static buffer of the cached graph that made it) once the update of the
        # few parameters it waits for is done
        k = layer.constants_for(x)
        xhat = mx.nd.BatchNorm(x, *k.normalised_args(self.mean, self.var), eps=eps, fix_gamma=False,
                               use_global_stats=True)
        dgamma, dbeta = bnchannel.to_host(out[1], out[2])
        total = layer.exchanges.backward(self.where, np.concatenate([dbeta, dgamma]))
        # the terms through the global statistics: -scale * (mean_g(dy) + xhat * mean_g(dy * xhat)),
        # a per-channel affine map of xhat
        coef = bnchannel.to_device(np.concatenate([-self.scale * total[c:] / self.n,
                                                   -self.scale * total[:c] / self.n]), x.context)
        through = mx.nd.BatchNorm(xhat, coef[:c], coef[c:], *k.affine_args, eps=eps, fix_gamma=False,
                                  use_global_stats=True)
        if reqs[0] in (1, 2):
            in_grads[0] += through
        else:
            in_grads[0] += out[0] + through
        _settled(written + [in_grads[0]])


class SyncBatchNorm(nn.BatchNorm):
    """A BatchNorm synchronized across ranks while training; plain BatchNorm in inference.

    Made by `convert`, which re-classes an existing layer in place: its parameters, names and
    registration stay exactly as they were (a checkpoint of it is a plain BatchNorm's)."""

    exchanges = None  # bnexchange.Exchanges
    layer_key = ""  # the layer's structural path: the same for a grid's copies of it
    _constants = None

    def constants_for(self, x) -> _Layer:
        """This layer's constants for x's shape and device (not child blocks: the network's
        hybridize must not reach them)."""
        key = (x.shape, x.context)
        if self._constants is None:
            self._constants = {}
        if key not in self._constants:
            self._constants[key] = _Layer(x.shape[1], x.size // x.shape[1], self._kwargs["eps"], x.context)
        return self._constants[key]

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        if not autograd.is_training() or self._kwargs["use_global_stats"] or self.exchanges is None:
            return super().hybrid_forward(F, x, gamma, beta, running_mean, running_var)
        if np.dtype(x.dtype) != np.float32:
            # mixed precision (train.precision: amp): statistics are taken in float32
            x = mx.nd.amp_cast(x, dtype="float32")
        return _SyncBN(self, running_mean, running_var)(x, gamma, beta)

    def hybridize(self, active=True, **kwargs):
        super().hybridize(False)  # its exchange cannot live inside a cached graph


def convert(net, bn_paths: list[str], exchanges) -> int:
    """Make the BatchNorm layers at `bn_paths` synchronized through `exchanges`. Returns how
    many changed."""
    count = 0
    for path in bn_paths:
        bn = find_block(net, path)
        if batchnorm_setting(bn, "axis", 1) != 1:
            raise ValueError(f"{path}: synchronized BatchNorm supports axis=1 only")
        if not isinstance(bn, SyncBatchNorm):
            bn.__class__ = SyncBatchNorm
            count += 1
        bn.exchanges, bn.layer_key = exchanges, path
    return count


def is_sync(block) -> bool:
    return isinstance(block, SyncBatchNorm)
