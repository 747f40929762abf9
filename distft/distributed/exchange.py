"""The gradient exchange: trainable gradients allreduced in fused buckets, with each step's
ballot (stop votes, non-finite losses) riding in the last bucket, and the verdict read from it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import mxnet as mx
import numpy as np

from distft.distributed.world import LocalWorld

DEFAULT_BUCKET_BYTES = 8 * 1024 * 1024


def bucket_bytes_for(setting, synchronized_bn: bool) -> Optional[int]:
    """`dist.bucket_bytes` resolved: a number stands; `auto` is 8 MiB, or None (every gradient
    in one bucket, allreduced once backward has made them all) where synchronized BatchNorm
    layers train. Their backward exchanges are rendezvous with the other ranks; buckets
    transferred meanwhile by Horovod's thread take cores and memory bandwidth from one rank's
    backward more than from another's, and each rendezvous then waits for the slower one
    (resnet50_v2 last stage, 2 ranks on 2 cores: 43-50 samples/s with 8 MiB buckets, 52-54 with
    one). Decided from what every rank shares (the config and the plan): ranks that chose
    differently would pair one rank's buckets with another's and wait forever. Measured on CPUs
    only; on GPUs the overlap it gives up may matter more (not measured there)."""
    if setting != "auto":
        return int(setting)
    return None if synchronized_bn else DEFAULT_BUCKET_BYTES


def buckets(sizes: list[int], bucket_bytes: Optional[int]) -> list[list[int]]:
    """Group tensor indices, in order, into buckets of about `bucket_bytes` (0: one per tensor;
    None: all in one)."""
    groups: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, nbytes in enumerate(sizes):
        if current and bucket_bytes is not None and (bucket_bytes == 0 or filled + nbytes > bucket_bytes):
            groups.append(current)
            current, filled = [], 0
        current.append(i)
        filled += nbytes
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class Verdict:
    """What every rank agreed about one step: whether any rank asked to stop, and which ranks'
    loss was not finite (the same on every rank, since it came out of an allreduce)."""

    stop: bool
    nonfinite_ranks: tuple
    nonfinite_heads: tuple = ()  # heads of a grid whose loss was not finite on some rank


class GradientExchange:
    """Allreduces (averages) the gradients of trainable parameters in fused buckets, optionally
    compressed to float16 on the wire, and counts bytes and time.

    Calling it only enqueues the allreduces: the update that follows is queued behind them and
    they overlap whatever the host does next (the next batch, the frozen prefix's forward).
    `wait()` blocks until they are done. Only the time after backward has finished counts as
    exposed allreduce time (`seconds_total`): first it waits, uncounted, for a one-value copy of
    each bucket's first gradient (in forward order: the last one backward writes), queued
    before the bucket's allreduce.

    It also carries each step's ballot, riding in the last bucket, so that ranks agree on
    decisions without a collective of their own: slot 0 is the rank's stop vote (e.g. it got
    SIGTERM), slot 1 + r is rank r's "my loss is not finite" (computed on the engine from the
    loss array, never read on the host before the exchange). With `heads` (a grid), slot
    1 + world size + k is "head k's loss is not finite here". `vote(stop, loss, head_losses)`
    before the step's exchange; `last_ballot` after it: the averaged ballot, still on the
    engine (read it with `read_verdict`), or None if no exchange ran."""

    def __init__(self, world: LocalWorld, params: list, bucket_bytes: Optional[int], compression: str = "none",
                 predivide: float = 1.0, heads: int = 0):
        self.world = world
        self.heads = heads
        self.params = params
        self.compression = compression
        self.predivide = predivide
        wire = 2 if compression == "fp16" else None
        sizes = [int(np.prod(p.shape)) * (wire or np.dtype(p.dtype).itemsize) for p in params]
        self.groups = buckets(sizes, bucket_bytes)
        self.bytes_per_step = sum(sizes) if world.size > 1 else 0
        self.allreduces_per_step = len(self.groups) if world.size > 1 else 0
        self.seconds_total = 0.0
        self.calls = 0
        self._stop = False
        self._loss = None
        self._head_losses: list = []
        self._ballot = None  # the allreduced ballot of the last exchange
        self._backward_done: list = []  # one value per bucket, written once backward has made it

    def vote(self, stop: bool, loss=None, head_losses=()) -> None:
        """`head_losses`: per head of a grid, its loss array (None: the head is stopped)."""
        self._stop, self._loss, self._head_losses = bool(stop), loss, list(head_losses)

    def ballot(self, ctx, dtype) -> mx.nd.NDArray:
        """This rank's ballot, built on the engine (no host synchronisation)."""
        ballot = mx.nd.zeros((1 + self.world.size + self.heads,), ctx=ctx, dtype="float32")
        ballot[0] = 1.0 if self._stop else 0.0
        slots = [(1 + self.world.rank, self._loss)]
        slots += [(1 + self.world.size + k, loss) for k, loss in enumerate(self._head_losses)]
        for slot, loss in slots:
            if loss is not None:
                finite = mx.nd.contrib.isfinite(loss.astype("float32").sum().reshape((1,)))
                ballot[slot:slot + 1] = (1 - finite).as_in_context(ctx)
        return ballot.astype(dtype, copy=False)

    @property
    def last_ballot(self):
        """The allreduced ballot of the last exchange (an engine array; None if it carried none)."""
        return self._ballot

    @property
    def backward_done(self) -> list:
        """Engine arrays computed once backward has written the last exchange's gradients."""
        return self._backward_done

    def wait(self) -> None:
        wait_all(self._backward_done)  # not the exchange's time
        start = time.perf_counter()
        wait_all(p.list_grad()[0] for p in self.params)
        self.seconds_total += time.perf_counter() - start

    def __call__(self) -> None:
        self._ballot, self._backward_done = None, []
        if self.world.size == 1 or not self.params:
            return
        # no wait for backward first: each bucket's allreduce starts as soon as its gradients
        # exist, overlapping the rest of backward
        last = len(self.groups) - 1
        for gi, group in enumerate(self.groups):
            grads = [self.params[i].list_grad()[0] for i in group]
            self._backward_done.append(mx.nd.slice_axis(grads[0].reshape((-1,)), axis=0, begin=0, end=1))
            wire = [g.astype(np.float16) for g in grads] if self.compression == "fp16" else list(grads)
            if gi == last:  # averaged: a slot is > 0 exactly when some rank put 1 there
                self._ballot = self.ballot(grads[0].context, wire[0].dtype)
                wire.append(self._ballot)
            self.world.allreduce_(wire, name=f"distft.grad.{gi}", average=True,
                                  prescale=1.0 / self.predivide, postscale=self.predivide)
            if self.compression == "fp16":
                for g, w in zip(grads, wire):
                    g[:] = w.astype(g.dtype)
        self.calls += 1


def wait_all(arrays) -> None:
    for arr in arrays:
        arr.wait_to_read()


def agree_verdict(world, exchange: GradientExchange, ctx) -> Verdict:
    """The ballot as a collective of its own (when no gradient exchange carried it)."""
    ballot = exchange.ballot(ctx, "float32")
    if world.size > 1:
        world.allreduce_([ballot], "distft.ballot", average=True)
    return read_verdict(ballot.asnumpy(), exchange.heads)


def read_verdict(averaged: np.ndarray, heads: int = 0) -> Verdict:
    ranks, per_head = averaged[1:len(averaged) - heads], averaged[len(averaged) - heads:]
    return Verdict(stop=bool(averaged[0] > 0),
                   nonfinite_ranks=tuple(int(r) for r in np.flatnonzero(ranks > 0)),
                   nonfinite_heads=tuple(int(k) for k in np.flatnonzero(per_head > 0)) if heads else ())
