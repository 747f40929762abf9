"""One training step and its non-finite guard.

A step takes this rank's share of the global batch in `accumulate` micro-batches: each one's
frozen-prefix features (computed outside autograd, or read from the feature cache), then the
trainable suffix under autograd and backward, gradients summed over the micro-batches. Then the
gradient exchange (trainable gradients only, fused buckets, the step's ballot in the last one)
and the update, rescaled by the samples of the share.

In the default mode (train.on_nonfinite: error, no float16 loss scaling, no heads.grid; with
a synchronized BN too) nothing waits for the exchange: the update is queued behind it, and the
step's verdict (the averaged gradients' norms, every rank's "my loss is not finite" from the
ballot) is read at the next step (`settle`), so the exchange overlaps the next batch. The
verdict is the same on every rank, so every rank stops, skips or scales the loss alike.
"""
from __future__ import annotations

import time
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd

from distft.distributed.exchange import Verdict, agree_verdict, read_verdict, wait_all
from distft import faults
from distft import precision
from distft.console import warn
from distft.errors import NumericalError
from distft.components.optim import trained_params


DOT_MIN_SIZE = 1 << 16  # elements: below this an array's engine calls cost more than its scalar loop


def sums_of_squares(arrays: list):
    """Each array's sum of squares, one float32 value per array (queued, not read): NaN or Inf
    where an array holds one (or values beyond ~1e19). MXNet's multi_sum_sq is a scalar loop on
    CPU: 27 ms per step for a ResNet-50 last stage's 18 M gradients, 5 ms as BLAS dot products
    (this machine). A dot product costs three engine calls, though, which many small arrays
    would pay for nothing (160 arrays of 512 floats: 9 ms against 0.2 ms), so only large float32
    arrays take it; the rest go through one multi_sum_sq."""
    large = {i for i, a in enumerate(arrays) if a.size >= DOT_MIN_SIZE and np.dtype(a.dtype) == np.float32}
    if not large:
        return mx.nd.multi_sum_sq(*arrays, num_arrays=len(arrays))
    small = [i for i in range(len(arrays)) if i not in large]
    parts = {}
    if small:
        sums = mx.nd.multi_sum_sq(*[arrays[i] for i in small], num_arrays=len(small))
        parts.update((i, sums[k:k + 1]) for k, i in enumerate(small))
    for i in large:
        flat = arrays[i].reshape((-1,))
        parts[i] = mx.nd.dot(flat, flat).reshape((1,))
    return mx.nd.concat(*(parts[i] for i in range(len(arrays))), dim=0)


class TrainingStep:
    def __init__(self, cfg, world, ctx, loss_fn, loss_scale, metrics, names: dict):
        self.cfg, self.world, self.ctx = cfg, world, ctx
        self.loss_fn, self.loss_scale, self.metrics, self.names = loss_fn, loss_scale, metrics, names
        self.pending: Optional[tuple] = None  # (sums, ballot, stop, loss, (step, epoch), backward done) not read yet
        self.skipped = 0
        self.stop_verdict = False

    def bind(self, runner, heads, plan, cache, batching) -> None:
        """The network, heads (each with its optimizer; one exchange) and plan in force (again
        after a freeze-plan switch)."""
        self.runner, self.heads, self.exchange, self.plan = runner, heads, heads.exchange, plan
        self.cache, self.batching = cache, batching
        self.params = [p for t in heads.trainers() for p in trained_params(t)]  # the exchange's order
        # a grid reads each step's verdict before the update, so that a diverging head stops
        # with finite weights
        self.deferred = self.cfg.train.on_nonfinite == "error" and not self.loss_scale.dynamic and not heads.grid
        for p in self.params:  # gradients summed over micro-batches
            p.grad_req = "add" if batching.accumulate > 1 else "write"
            if batching.accumulate > 1:
                p.zero_grad()

    def features(self, idx, x):
        """The frozen prefix's output: from the feature cache, or computed (inference mode,
        nothing recorded) and, with the cache on, kept."""
        if self.cache is not None and self.cache.has_all(idx):
            return mx.nd.array(self.cache.get(idx), ctx=self.ctx)
        # float32 at the seam, as cached features are: under AMP a low-precision leaf given an
        # input gradient (FreezePlan.input_grad) fails MXNet's backward shape inference
        out = precision.to_float32(self.runner.features(mx.nd.array(x, ctx=self.ctx)))
        if self.cache is not None:
            self.cache.put(idx, out.asnumpy())
        return out

    def __call__(self, idx, x, y, lrs: list, stop: bool, step: int, epoch: int) -> list:
        """Step `step` (1-based: the update it makes) over this rank's share, for every head
        still training (`lrs`: each head's learning rate). Returns each head's mean loss (None
        for a head that stopped)."""
        heads = self.heads.active
        for h in heads:
            h.trainer.set_learning_rate(lrs[h.index])
        scale = self.loss_scale.scale
        micro = self.batching.micro
        totals = {}
        for j in range(self.batching.accumulate):
            part = slice(j * micro, (j + 1) * micro)
            features = self.features(idx[part], None if x is None else x[part])
            if self.plan.input_grad:
                features.attach_grad()  # so backward reaches a statistics-only BN (see FreezePlan)
            labels = mx.nd.array(y[part], ctx=self.ctx)
            if self.heads.in_lockstep:  # synchronized BNs: every head's forward, then one backward
                losses = self.heads.losses(heads, features, labels, scale)
                for k, (h, (loss, scaled)) in enumerate(zip(heads, losses)):
                    # one backward call per head: one call for all plans their buffers as one
                    # sequence, which makes a head's exchange wait for a later head's (a hang);
                    # their graphs share the prefix output, kept until the last head's call
                    scaled.backward(retain_graph=k < len(losses) - 1)
                    totals[h.index] = loss.sum() if j == 0 else totals[h.index] + loss.sum()
                continue
            for h in heads:  # one prefix pass (or cache read), every head's trainable part
                with autograd.record():
                    loss = h.loss_fn(h.suffix(features), labels)
                    scaled = loss * scale if scale != 1.0 else loss
                scaled.backward()
                totals[h.index] = loss.sum() if j == 0 else totals[h.index] + loss.sum()
        for h in heads:
            if faults.nonfinite_loss(self.world.rank, step, h.name if self.heads.grid else None):
                totals[h.index] = totals[h.index] * float("nan")
        total = sum(totals.values()) if len(totals) > 1 else totals[heads[0].index]
        self.exchange.vote(stop, total, [totals.get(h.index) for h in self.heads] if self.heads.grid else ())
        self.exchange()  # trainable gradients of every head, fused buckets, the ballot
        ballot = self.exchange.last_ballot
        if ballot is None and self.world.size > 1:  # nothing exchanged: the ballot on its own
            ballot = agree_verdict(self.world, self.exchange, self.ctx)
        grads = [p.list_grad()[0] for p in self.params]
        # the sum of squares of each averaged gradient (queued, not read)
        sums = sums_of_squares(grads) if grads else None
        if self.deferred:
            trainer = self.heads[0].trainer
            trainer.update(self.batching.per_rank)
            self._zero_accumulated()
            loss_value = float(total.asscalar()) / self.batching.per_rank
            self.settle()  # the previous step's verdict: computed by now
            self.pending = (sums, ballot, stop, loss_value, (step, epoch), self.exchange.backward_done)
            return [loss_value]
        self.exchange.wait()
        losses = {k: float(t.asscalar()) / self.batching.per_rank for k, t in totals.items()}
        verdict = self._verdict(ballot, stop, losses)
        self.stop_verdict = self.stop_verdict or verdict.stop
        if self.heads.grid:
            per_tensor = sums.asnumpy() if sums is not None else np.zeros(0)
            for h in self.heads.judge(self.world, verdict, per_tensor, step, epoch):
                h.trainer.update(self.batching.per_rank)
        elif self._finite(sums, verdict, (step, epoch)):
            self.heads[0].trainer.update(self.batching.per_rank * scale)  # also undoes the loss scale
            self.loss_scale.stepped()
        self._zero_accumulated()
        return [losses.get(h.index) if h.diverged is None else None for h in self.heads]

    def _zero_accumulated(self) -> None:
        if self.batching.accumulate > 1:
            for p in self.params:
                p.zero_grad()

    def _verdict(self, ballot, stop: bool, losses) -> Verdict:
        """`losses`: this rank's mean loss, or {head index: mean loss}."""
        if isinstance(ballot, Verdict):
            return ballot
        if ballot is None:  # one rank: its own word is the verdict
            losses = losses if isinstance(losses, dict) else {0: losses}
            bad = tuple(k for k, v in losses.items() if not np.isfinite(v))
            return Verdict(stop, (0,) if bad else (), bad if self.heads.grid else ())
        return read_verdict(ballot.asnumpy(), self.exchange.heads)

    def settle(self) -> None:
        """Read the pending verdict (a no-op when none is pending). Everything that reads or
        writes the weights (checkpoints, evaluation, the end, a freeze-plan switch) settles
        first, so a non-finite update never reaches a file."""
        if self.pending is None:
            return
        (sums, ballot, stop, loss_value, where, backward_done), self.pending = self.pending, None
        wait_all(backward_done)  # not the exchange's time
        start = time.perf_counter()
        verdict = self._verdict(ballot, stop, loss_value)
        self.stop_verdict = self.stop_verdict or verdict.stop
        self._finite(sums, verdict, where)
        self.exchange.seconds_total += time.perf_counter() - start  # waited on the exchange

    def agreed_stop(self) -> bool:
        """Whether the ranks agreed to stop, read from the last verdict settled (the same step
        on every rank)."""
        agreed, self.stop_verdict = self.stop_verdict, False
        return agreed

    def _finite(self, sums, verdict: Verdict, where: tuple) -> bool:
        """NaN/Inf in any rank's loss or in the allreduced gradients (agreed data): stop, or
        skip the update."""
        per_tensor = sums.asnumpy() if sums is not None else np.zeros(0)
        if not verdict.nonfinite_ranks and np.isfinite(per_tensor).all():
            return True
        names = [self.names[p] for p, v in zip(self.params, per_tensor) if not np.isfinite(v)]
        if self.loss_scale.dynamic and not verdict.nonfinite_ranks:
            # float16 gradients overflowed at this loss scale: the usual AMP step, not an error
            self.loss_scale.overflowed()
            return False
        step, epoch = where
        # the check reads each gradient's sum of squares: NaN/Inf, or values beyond ~1e19
        parts = []
        if verdict.nonfinite_ranks:
            parts.append(f"non-finite loss on rank(s) {list(verdict.nonfinite_ranks)}")
        if names:
            parts.append(f"non-finite gradient norms in {', '.join(names[:5])}"
                         + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
        what = "; ".join(parts)
        if self.cfg.train.on_nonfinite == "error":
            raise NumericalError(f"step {step} (epoch {epoch}): {what} "
                                 "(lower optimizer.lr, or set train.on_nonfinite: skip)")
        self.skipped += 1
        self.metrics.skipped(1)
        warn(self.world, f"step {step} (epoch {epoch}): {what}; update skipped ({self.skipped} so far)")
        return False

    def check_weights(self, step: int, epoch: int) -> None:
        """Finite gradients can still make non-finite weights (a huge learning rate): such a
        model never reaches a checkpoint."""
        weights = [p.data() for p in self.params]
        if not weights:
            return
        sums = sums_of_squares(weights).asnumpy()
        bad = [self.names[p] for p, v in zip(self.params, sums) if not np.isfinite(v)]
        if bad:
            raise NumericalError(f"step {step} (epoch {epoch}): non-finite weights in "
                                 f"{', '.join(bad[:5])} after the update; checkpoint not written, the previous "
                                 "one is intact (lower optimizer.lr)")
