"""The statistics channel: how a synchronized BatchNorm sums a few KiB across ranks, apart from
the gradient queue (`dist.bn_channel`).

A layer's exchange is latency-bound (2C+1 values, twice per layer and step, each on the
critical path), the gradient exchange is bandwidth-bound (megabytes per step). Horovod's queue
serves both alike: one background thread, a cycle, a negotiation per tensor, behind the
gradient buckets. Measured on 2 ranks of one machine: 2-6 us for a 4 KiB sum through MPI,
about 1,500 us through Horovod's queue.

- `MPIChannel`: two duplicates of MPI_COMM_WORLD through mpi4py, one per direction. Forward
  exchanges run on the main thread, backward ones on MXNet's custom-operator threads (one
  at a time: `bnexchange` orders them), and Horovod's own thread uses its communicator, so MPI
  must grant MPI_THREAD_MULTIPLE. Up under every MPI launcher: mpirun, horovodrun without
  --gloo (when Horovod has MPI), srun --mpi=pmix.
- `HorovodChannel`: Horovod's allreduce, under one stable name per layer and direction. The
  only channel under horovodrun --gloo, where no MPI runs.
- `LocalChannel`: one process.

Every channel sums float64 host arrays in place: a layer stages its 2C+1 values through the
host whatever its device (`to_host` / `to_device`).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from distft.errors import ConfigError

CHOICES = ("auto", "mpi", "horovod")


class LocalChannel:
    name = "local"

    def allreduce(self, values: np.ndarray, direction: str, key: str) -> np.ndarray:
        return values


class MPIChannel:
    """MPI_Allreduce (sum) on one communicator per direction, waited for politely: a blocking
    MPI call (Open MPI's, unless oversubscribed) polls at 100% of a core while the other rank
    is still computing, and on shared cores that is the other rank's, or this rank's own
    kernels' (measured: a training step ~7x slower). So the call is non-blocking, and the wait
    gives the core away between tests: it spins `spin_s` (a peer already there answers in
    microseconds), then yields the core (sched_yield, the GIL released) up to `yield_s`: any
    runnable thread runs first, and when none does the next test comes at once; a peer later than
    that (a checkpoint, validation, a slow node) is polled with sleeps from `poll_s` doubling to
    `max_poll_s`, which leave the core idle. Sleeps from the start cost the wake-up on busy cores
    at every exchange (median 120 us, mean 330-440 us after both ranks were there): 54.9 against
    58.1 samples/s with yields (resnet50_v2 last stage, 2 ranks at 64 px, 7 interleaved runs
    each); 10 us sleeps all along took 70% of an idle core through a long wait."""

    name = "mpi"

    def __init__(self, comm, spin_s: float = 20e-6, yield_s: float = 5e-3, poll_s: float = 10e-6,
                 max_poll_s: float = 1e-3):
        from mpi4py import MPI

        self._sum = MPI.SUM
        self._in_place = MPI.IN_PLACE
        self.spin_s, self.yield_s, self.poll_s, self.max_poll_s = spin_s, yield_s, poll_s, max_poll_s
        self._slack_set = threading.local()
        # collective on every rank, at the same point of start-up (build_network)
        self.comms = {"forward": comm.Dup(), "backward": comm.Dup()}

    def allreduce(self, values: np.ndarray, direction: str, key: str) -> np.ndarray:
        request = self.comms[direction].Iallreduce(self._in_place, values, op=self._sum)
        if request.Test():
            return values
        _fine_sleeps(self._slack_set)
        start = time.perf_counter()
        spin_until, yield_until, nap = start + self.spin_s, start + self.yield_s, self.poll_s
        while not request.Test():
            now = time.perf_counter()
            if now > yield_until:
                time.sleep(nap)
                nap = min(2 * nap, self.max_poll_s)
            elif now > spin_until:
                os.sched_yield()
        return values


def _fine_sleeps(done: threading.local) -> None:
    """Let this thread's short sleeps last about what they ask (Linux rounds a sleep up by the
    thread's timer slack, 50 us by default)."""
    if getattr(done, "set", False):
        return
    done.set = True
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK: 1 ns
    except (OSError, AttributeError):
        pass


class HorovodChannel:
    """Horovod's allreduce of a host array, waited for (its queue, its cycle)."""

    name = "horovod"

    def __init__(self, hvd):
        self.hvd = hvd

    def allreduce(self, values: np.ndarray, direction: str, key: str) -> np.ndarray:
        import mxnet as mx

        # one name per layer, direction and size: Horovod's response cache then hits from the
        # second step on (a name must keep its shape)
        arr = mx.nd.array(values, dtype=values.dtype)
        suffix = "stats" if direction == "forward" else "grad"  # the names distft.timeline groups by
        out = self.hvd.allreduce(arr, average=False, name=f"distft.syncbn.{key}.{values.size}.{suffix}")
        values[:] = out.asnumpy()
        return values


def mpi_thread_level_ok() -> tuple[bool, str]:
    from mpi4py import MPI

    level = MPI.Query_thread()
    names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED", MPI.THREAD_SERIALIZED: "SERIALIZED",
             MPI.THREAD_MULTIPLE: "MULTIPLE"}
    return level >= MPI.THREAD_MULTIPLE, names.get(level, str(level))


def open_channel(choice: str, world):
    """The channel `dist.bn_channel` asks for on this world: `auto` is MPI wherever MPI is up
    (with the thread level it needs), else Horovod's queue."""
    if choice not in CHOICES:
        raise ConfigError(f"dist.bn_channel: {choice!r} is not one of {', '.join(CHOICES)}")
    if world.size == 1:
        return LocalChannel()
    comm = getattr(world, "mpi_comm", None)
    if comm is not None and choice in ("auto", "mpi"):
        ok, level = mpi_thread_level_ok()
        if ok:
            return MPIChannel(comm)
        if choice == "mpi":
            raise ConfigError(f"dist.bn_channel: mpi needs MPI_THREAD_MULTIPLE, this MPI granted MPI_THREAD_{level} "
                              "(set dist.bn_channel: horovod)")
    elif choice == "mpi":
        raise ConfigError("dist.bn_channel: mpi needs an MPI launcher (mpirun, horovodrun without --gloo, "
                          f"srun --mpi=pmix); this job runs under {_launcher()} (set dist.bn_channel: auto or horovod)")
    return HorovodChannel(world.hvd)


def _launcher() -> str:
    return "horovodrun --gloo" if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ else "a launcher without MPI"


# --- staging: a layer's few values through the host, whatever its device -----------------------

def to_host(*arrays) -> list:
    """float64 host copies of device arrays (a GPU array waits for its kernel, then 4C bytes
    cross the bus)."""
    return [a.asnumpy().astype(np.float64) for a in arrays]


def to_device(values: np.ndarray, ctx, dtype="float32"):
    """A new device array holding `values` (never reused: see syncbn's engine-order rules).
    On the CPU it shares the host array's memory: no copy, and no wait on MXNet's engine,
    where a synchronous write (`arr[:] = values`, `_sync_copyfrom`) queues an empty operation
    behind every kernel already queued and waits for it. A GPU array is an asynchronous copy
    of it."""
    import mxnet as mx

    host = mx.nd.from_numpy(np.ascontiguousarray(values, dtype=dtype), zero_copy=True)
    return host if ctx.device_type == "cpu" else host.as_in_context(ctx)


def copy_into(arr, values: np.ndarray) -> None:
    """Write host `values` into the device array `arr`: an operation queued on the engine,
    after what is queued on `arr` (the caller does not wait)."""
    to_device(values, arr.context, arr.dtype).copyto(arr)


# --- latency --------------------------------------------------------------------------------------

def latency_us(channel, values: int, iters: int, direction: str = "forward") -> float:
    """Median microseconds of one sum of `values` float64 (what a layer's exchange carries)."""
    buf = np.ones(values, dtype=np.float64)
    samples = []
    for i in range(iters + 5):
        start = time.perf_counter()
        channel.allreduce(buf, direction, "latency")
        if i >= 5:  # the first calls negotiate and fill caches
            samples.append(time.perf_counter() - start)
        buf[:] = 1.0
    return float(np.median(samples) * 1e6)
