"""The Horovod seam. Everything collective goes through a World: LocalWorld for one process
(no launcher), HorovodWorld under horovodrun / mpirun / srun. The rest of distft never imports
horovod."""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import gluon

from . import imaging
from .errors import DistributedError


_LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def launched_by_scheduler() -> bool:
    """True when a launcher started several ranks (horovodrun, mpirun, srun)."""
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def gpu_index(rank: int, local_rank: int, local_size: int, visible: int, cuda_visible) -> Optional[int]:
    """Which of the GPUs this process can see is this rank's (None: the CPU).

    One GPU visible: it is this rank's, whatever its local rank (Slurm's --gpus-per-task=1,
    Kubernetes' device plugin). All of the node's GPUs visible: the local rank's. Anything
    else cannot be mapped one GPU per rank and is an error naming the device."""
    if visible == 0:
        return None
    if visible == 1:
        return 0
    if local_rank < visible and visible >= local_size:
        return local_rank
    raise DistributedError(
        f"rank {rank} (local rank {local_rank} of {local_size} on this node) has no GPU of its own: this process "
        f"sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES={cuda_visible if cuda_visible is not None else 'unset'}); "
        f"give each rank exactly one GPU, or every rank all {local_size} of the node's")


def device_for_rank(rank: int, local_rank: int, local_size: int, visible: int, cuda_visible=None):
    index = gpu_index(rank, local_rank, local_size, visible, cuda_visible)
    return mx.cpu() if index is None else mx.gpu(index)


def digest(arr: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).digest()[:8]


class LocalWorld:
    """One process: collectives are identities."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    cross_rank = 0  # index of this rank's node
    backend = "local"

    def context(self):
        return device_for_rank(self.rank, self.local_rank, self.local_size, mx.context.num_gpus(),
                               os.environ.get("CUDA_VISIBLE_DEVICES"))

    # all of these return bytes moved on the wire by this rank (0 here)
    def broadcast_(self, arrays: list, name: str) -> int:
        return 0

    def allreduce_(self, arrays: list, name: str, average: bool = True, prescale: float = 1.0,
                   postscale: float = 1.0) -> None:
        return None

    def allgather_bytes(self, payload: bytes, name: str) -> list[bytes]:
        return [payload]

    def allreduce_numpy(self, value: np.ndarray, name: str) -> np.ndarray:
        return np.asarray(value)

    _bn_exchanges = None

    def bn_exchanges(self, choice: str = "auto"):
        """The synchronized BatchNorm exchanges of this world over the statistics channel
        `dist.bn_channel` asks for (bnchannel), opened once (collective: every rank at the same
        point)."""
        from .bnchannel import open_channel
        from .bnexchange import Exchanges

        if self._bn_exchanges is None or self._bn_exchanges[0] != choice:
            self._bn_exchanges = (choice, Exchanges(open_channel(choice, self)))
        return self._bn_exchanges[1]


class HorovodWorld(LocalWorld):
    backend = "horovod"
    mpi_comm = None  # MPI_COMM_WORLD where an MPI launcher started the ranks

    def __init__(self):
        imaging.load_pillow()  # Pillow's codecs bound before Horovod makes MXNet's global
        import horovod.mxnet as hvd

        self.hvd = hvd
        if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ:
            hvd.init()  # horovodrun --gloo: its rendezvous names the ranks
        else:
            # MPI launchers (mpirun, srun, horovodrun --mpi): take the ranks the scheduler started
            # (mpi4py asks for MPI_THREAD_MULTIPLE: the statistics channel needs it)
            from mpi4py import MPI

            hvd.init(comm=MPI.COMM_WORLD)
            self.mpi_comm = MPI.COMM_WORLD
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self.cross_rank = hvd.cross_rank()
        self.backend = "gloo" if hvd.gloo_enabled() and "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ else "mpi"

    def broadcast_(self, arrays: list, name: str) -> int:
        # MXNet's oneDNN inference path may have reordered a weight in place into a blocked
        # layout that Horovod cannot read: send a plain-layout copy and write it back.
        copies = [arr.copy() for arr in arrays]
        for i, tmp in enumerate(copies):
            self.hvd.broadcast_(tmp, root_rank=0, name=f"{name}.{i}")
        for arr, tmp in zip(arrays, copies):
            arr[:] = tmp
        mx.nd.waitall()
        return sum(a.size * np.dtype(a.dtype).itemsize for a in arrays)

    def allreduce_(self, arrays: list, name: str, average: bool = True, prescale: float = 1.0,
                   postscale: float = 1.0) -> None:
        if not arrays:
            return
        self.hvd.grouped_allreduce_(arrays, average=average, name=name,
                                    prescale_factor=prescale, postscale_factor=postscale)

    def allgather_bytes(self, payload: bytes, name: str) -> list[bytes]:
        """Gathers one byte string per rank (lengths may differ)."""
        lengths = self.hvd.allgather(mx.nd.array([len(payload)], dtype=np.int64), name=f"{name}.len")
        lengths = [int(n) for n in lengths.asnumpy()]
        data = np.frombuffer(payload, dtype=np.uint8) if payload else np.zeros(0, np.uint8)
        gathered = self.hvd.allgather(mx.nd.array(data, dtype=np.uint8).reshape((-1,)), name=name)
        flat = gathered.asnumpy().tobytes()
        out, pos = [], 0
        for n in lengths:
            out.append(flat[pos:pos + n])
            pos += n
        return out

    def allreduce_numpy(self, value: np.ndarray, name: str) -> np.ndarray:
        arr = mx.nd.array(np.asarray(value, dtype=np.float64), dtype=np.float64)
        return self.hvd.allreduce(arr, average=False, name=name).asnumpy()



def init_world(stall_timeout: float = 0.0) -> LocalWorld:
    if not launched_by_scheduler():
        return LocalWorld()
    # Horovod's background thread looks for ready tensors every cycle: latency on a synchronized
    # BatchNorm's critical path (each layer waits for one exchange forward and one backward).
    # 1 ms, as launch.sh sets it: one exchange measured 3.6 ms with the variable unset, 1.7 ms
    # at 1 ms (distft.syncbench, 2 ranks on 2 cores; the library's own default is not documented
    # in one place: horovodrun's help says 1 ms)
    os.environ.setdefault("HOROVOD_CYCLE_TIME", "1")
    if stall_timeout:
        # Horovod's stall inspector names the ranks that never joined a collective, then
        # shuts Horovod down so the waiting ranks fail instead of hanging (read at init)
        check = max(1, int(min(60, stall_timeout / 2)))
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(check))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(max(int(stall_timeout), check + 1)))
    return HorovodWorld()


# --- gradient exchange -------------------------------------------------------------------------


def buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Group tensor indices, in order, into buckets of about `bucket_bytes` (0: one per tensor)."""
    groups: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, nbytes in enumerate(sizes):
        if current and (bucket_bytes == 0 or filled + nbytes > bucket_bytes):
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

    def __init__(self, world: LocalWorld, params: list, bucket_bytes: int, compression: str = "none",
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


class Trainer(gluon.Trainer):
    """gluon.Trainer over the trainable parameters only, with our gradient exchange in place of
    a kvstore (the Horovod DistributedTrainer pattern: override only the exchange)."""

    def __init__(self, params: dict, optimizer: str, optimizer_params: dict,
                 exchange: Optional[GradientExchange]):
        super().__init__(params, optimizer, optimizer_params, kvstore=None, update_on_kvstore=False)
        self.exchange = exchange

    def _allreduce_grads(self):
        if self.exchange is not None:
            self.exchange()
