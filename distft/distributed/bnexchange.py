"""Synchronized BatchNorm exchanges in one order on every rank.

A collective must be entered in the same order on every rank. A synchronized BN's forward
exchanges run on the main thread, in program order: the same everywhere. Its backward ones run
on MXNet's custom-operator threads, as soon as each layer's output gradient is ready, several
at once: micro-batches whose backward passes overlap, heads of a grid, parallel branches (a
ResNet v1 downsample BN beside bn3) reach them in an order that differs between ranks. So a
layer's forward registers a slot for its backward exchange, and the slots are exchanged
pass after pass, each pass in the reverse order of its forward, which is an order backward
can always follow (a layer's gradient never waits for an earlier layer's). A pass ends where a
layer shows up again. A layer whose input needs no gradient (the first trainable BN after the
frozen prefix) registers no slot: its backward needs no global sums.

A grid's heads (`lockstep`) run their trainable parts side by side, as greenlets on the main
thread: each head's forward stops at a synchronized BN with its local sums, and when every head
has, one exchange carries them all. Backward exchanges go head after head: MXNet runs one head's
backward pass after the other's, so one slot for every head of a layer would wait forever.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Optional

import numpy as np


class Slot:
    """One backward exchange: a layer's sums from each of `parts` heads."""

    def __init__(self, key: str, parts: int):
        self.key, self.parts = key, parts
        self.values: dict = {}  # head position -> local sums (None: that head skips)
        self.results: Optional[dict] = None

    @property
    def complete(self) -> bool:
        return len(self.values) == self.parts


class _Pass:
    def __init__(self):
        self.slots: list[Slot] = []
        self.keys: set = set()


class Exchanges:
    """A synchronized BN layer's sums through `channel`, in one order on every rank."""

    def __init__(self, channel):
        self.channel = channel
        self._cond = threading.Condition()
        self._passes: deque = deque()
        self._open: dict = {}  # lane -> the pass being registered
        self._busy = False  # a thread is inside the channel's backward exchange
        self._lockstep: Optional[_Lockstep] = None
        self.counts = {"forward": 0, "backward": 0}  # exchanges made through the channel

    # --- forward (main thread) -------------------------------------------------------------------
    def forward(self, key: str, values: np.ndarray, backward: bool) -> tuple:
        """The sums over ranks of `values` (float64), and where this layer's backward exchange
        goes ((slot, position), or None with `backward` False)."""
        if self._lockstep is not None and self._lockstep.inside():
            return self._lockstep.park(key, values, backward)
        total = self.channel.allreduce(values, "forward", key)
        self.counts["forward"] += 1
        return total, ((self.expect(key, 1), 0) if backward else None)

    def expect(self, key: str, parts: int = 1, lane: int = 0) -> Slot:
        """Register the backward exchange of layer `key` (called in forward order). Each head of
        a grid (`lane`) has passes of its own: MXNet runs one head's backward after another's
        (measured: a head's first backward callback comes once the previous head's last has
        returned), so their exchanges go head after head."""
        slot = Slot(key, parts)
        with self._cond:
            current = self._open.get(lane)
            if current is None or key in current.keys:
                current = self._open[lane] = _Pass()
                self._passes.append(current)
            current.slots.append(slot)
            current.keys.add(key)
        return slot

    # --- backward (custom-operator threads) ------------------------------------------------------
    def backward(self, where: tuple, values: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The sums over ranks of this head's `values` at its slot, once every slot before it has
        been exchanged (None `values`: this head skips, and gets None)."""
        slot, position = where
        with self._cond:
            slot.values[position] = values
            self._cond.notify_all()
            while slot.results is None:
                nxt = self._next()
                if nxt is not None and nxt.complete and not self._busy:
                    self._run(nxt)
                else:
                    self._cond.wait()
            return slot.results[position]

    def _next(self) -> Optional[Slot]:
        while self._passes:
            first = self._passes[0]
            if first.slots:
                return first.slots[-1]
            if len(self._passes) == 1:
                return None  # the pass still being registered
            done = self._passes.popleft()
            self._open = {lane: p for lane, p in self._open.items() if p is not done}
        return None

    def _run(self, slot: Slot) -> None:
        """Exchange `slot` (called holding the lock; releases it around the channel)."""
        self._busy = True
        parts = [slot.values[i] for i in range(slot.parts)]
        sent = [p for p in parts if p is not None]
        self._cond.release()
        try:
            total = self.channel.allreduce(np.concatenate(sent), "backward", slot.key) if sent else None
            self.counts["backward"] += 1 if sent else 0
        finally:
            self._cond.acquire()
            self._busy = False
        results, start = {}, 0
        for i, part in enumerate(parts):
            if part is None:
                results[i] = None
            else:
                results[i], start = total[start:start + part.size], start + part.size
        slot.results = results
        self._passes[0].slots.pop()
        self._cond.notify_all()

    # --- a grid's heads side by side -----------------------------------------------------------
    def lockstep(self, runs: list) -> list:
        """Run each of `runs` (callables: one head's recorded forward) to its end, all heads'
        synchronized BN exchanges of a layer in one. Returns their results in order."""
        if len(runs) == 1:
            return [run() for run in runs]
        self._lockstep = _Lockstep(self, runs)
        try:
            return self._lockstep.run()
        finally:
            self._lockstep = None


class _Lockstep:
    def __init__(self, exchanges: Exchanges, runs: list):
        from greenlet import greenlet

        self.exchanges = exchanges
        self.parent = greenlet.getcurrent()
        self.greenlets = [greenlet(run) for run in runs]
        self.parked: list = []  # (position, key, values, backward) of the current layer

    def inside(self) -> bool:
        from greenlet import getcurrent

        return getcurrent() in self.greenlets

    def park(self, key: str, values: np.ndarray, backward: bool) -> tuple:
        from greenlet import getcurrent

        self.parked.append((self.greenlets.index(getcurrent()), key, values, backward))
        return self.parent.switch()

    def run(self) -> list:
        results: list = [None] * len(self.greenlets)
        done = set()
        for i, g in enumerate(self.greenlets):
            self._step(i, g, (), results, done)
        while self.parked:
            parked, self.parked = self.parked, []
            if done or len({(key, v.size) for _, key, v, _ in parked}) != 1:
                raise RuntimeError("heads.grid: the heads reached different synchronized BatchNorm layers "
                                   f"({sorted({key for _, key, _, _ in parked})}); their trainable parts differ")
            key, backward = parked[0][1], parked[0][3]
            total = self.exchanges.channel.allreduce(np.concatenate([v for _, _, v, _ in parked]), "forward", key)
            self.exchanges.counts["forward"] += 1
            size = parked[0][2].size
            for n, (i, _, _, _) in enumerate(parked):
                where = (self.exchanges.expect(key, 1, lane=n), 0) if backward else None
                self._step(i, self.greenlets[i], (total[n * size:(n + 1) * size], where), results, done)
        return results

    def _step(self, i: int, g, args: tuple, results: list, done: set) -> None:
        out = g.switch(*args) if args else g.switch()
        if g.dead:
            results[i] = out
            done.add(i)
