"""The Horovod seam: everything collective goes through a World. LocalWorld for one process
(no launcher), HorovodWorld under horovodrun / mpirun / srun. The rest of distft never imports
horovod (bench/baseline.py, the plain Horovod loop distft is measured against, takes it from
`horovod()` here)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import mxnet as mx
import numpy as np

from distft import launchenv
from distft.data import imaging
from distft.distributed.bnchannel import mpi_thread_level_ok, open_channel
from distft.distributed.bnexchange import Exchanges
from distft.errors import DistributedError


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
    cycle_ms = None  # Horovod's cycle (HOROVOD_CYCLE_TIME) in force
    fusion_bytes = None  # Horovod's fusion buffer (HOROVOD_FUSION_THRESHOLD) in force
    mpi_yield = None  # Open MPI's mpi_yield_when_idle in force (MPI launchers only)

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

    def allgather_json(self, value, name: str) -> list:
        """Every rank's JSON-able `value`, in rank order (through `allgather_bytes`)."""
        return [json.loads(b) for b in self.allgather_bytes(json.dumps(value).encode(), name)]

    _bn_exchanges = None

    def bn_exchanges(self, choice: str = "auto"):
        """The synchronized BatchNorm exchanges of this world over the statistics channel
        `dist.bn_channel` asks for (bnchannel), opened once (collective: every rank at the same
        point)."""
        if self._bn_exchanges is None or self._bn_exchanges[0] != choice:
            self._bn_exchanges = (choice, Exchanges(open_channel(choice, self)))
        return self._bn_exchanges[1]


def horovod():
    """horovod.mxnet, imported after Pillow's codecs are bound (Horovod makes MXNet's global):
    the one place distft imports Horovod."""
    imaging.load_pillow()
    import horovod.mxnet as hvd

    return hvd


def horovod_has_mpi() -> bool:
    """Whether the installed Horovod was built with MPI (read without starting it)."""
    from horovod.common.util import mpi_built

    return bool(mpi_built())


class HorovodWorld(LocalWorld):
    backend = "horovod"
    mpi_comm = None  # MPI_COMM_WORLD where an MPI launcher started the ranks

    def __init__(self, statistics: Optional[str] = None):
        hvd = self.hvd = horovod()
        # horovodrun --gloo: its rendezvous names the ranks (no MPI: statistics go through the
        # queue). MPI launchers (mpirun, srun, horovodrun --mpi): take the ranks the scheduler
        # started (mpi4py asks for MPI_THREAD_MULTIPLE: the statistics channel needs it)
        gloo = "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ
        if not gloo:
            os.environ.setdefault(MPI_YIELD, "1")  # read by MPI_Init, which importing mpi4py runs
            from mpi4py import MPI

            self.mpi_comm = MPI.COMM_WORLD
            self.mpi_yield = os.environ[MPI_YIELD]
        multiple = gloo or statistics is None or mpi_thread_level_ok()[0]
        os.environ.setdefault("HOROVOD_CYCLE_TIME", queue_cycle_ms(gloo, statistics, multiple))
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(FUSION_BUFFER_BYTES))
        self.cycle_ms = horovod_cycle_ms(os.environ)
        self.fusion_bytes = int(os.environ["HOROVOD_FUSION_THRESHOLD"]) \
            if os.environ["HOROVOD_FUSION_THRESHOLD"].isdigit() else None
        if gloo:
            hvd.init()
        else:
            hvd.init(comm=self.mpi_comm)
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self.cross_rank = hvd.cross_rank()
        self.backend = "gloo" if hvd.gloo_enabled() and gloo else "mpi"

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


def init_world(stall_timeout: float = 0.0, statistics: Optional[str] = None) -> LocalWorld:
    """This process's world. `statistics`: the `dist.bn_channel` asked for where sums on the
    critical path go through the statistics channel (synchronized BatchNorm, the lbfgs
    solver's passes), None where none do; it sets Horovod's cycle (`queue_cycle_ms`)."""
    if not launchenv.started_ranks(os.environ):
        return LocalWorld()
    if stall_timeout:
        # Horovod's stall inspector names the ranks that never joined a collective, then
        # shuts Horovod down so the waiting ranks fail instead of hanging (read at init)
        check = max(1, int(min(60, stall_timeout / 2)))
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(check))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(max(int(stall_timeout), check + 1)))
    return HorovodWorld(statistics)


# Horovod copies the tensors of one fused allreduce into a buffer of this size and back (its
# default: 128 MiB in 0.28's code, 64 in its docs), where a user set no
# HOROVOD_FUSION_THRESHOLD. distft already groups the gradients into buckets
# (`dist.bucket_bytes`); a buffer as large as all of them is a second copy of every gradient in
# each rank's memory. resnet50_v2's last stage in one 57 MiB bucket, 2 ranks at 64 px: peak RSS
# 629-630 MiB with 64 MiB, 556-566 with 8 MiB, and 51.5-52.4 -> 56.4-56.9 samples/s (less
# memory traffic on shared cores).
FUSION_BUFFER_BYTES = 8 * 1024 * 1024

# Open MPI's progress loop yields the core while a blocking call waits (its default only when a
# node is oversubscribed; a user's OMPI_MCA_mpi_yield_when_idle wins). Horovod's background
# thread waits in blocking MPI calls every cycle (its negotiation) and in each gradient
# allreduce; polling there takes a core from the step's own threads whenever ranks share
# cores with anything: 52.5-57.7 -> 66.4-68.1 samples/s for resnet50_v2's last stage, 2 ranks
# on 2 cores at 64 px (interleaved runs). Other MPIs ignore the variable.
MPI_YIELD = "OMPI_MCA_mpi_yield_when_idle"


def queue_cycle_ms(gloo: bool, statistics: Optional[str], thread_multiple: bool) -> str:
    """How often Horovod's background thread looks for ready tensors (HOROVOD_CYCLE_TIME, where
    the user set none). Each cycle is a negotiation among the ranks, and on shared cores it takes
    CPU from the step: with 2 ranks on 2 cores, resnet50_v2 last stage + head at 64 px, distft
    went from 42 to 52 samples/s at 5 ms against Horovod's default of 1 ms (plain Horovod from 59
    to 70). 1 ms where latency-bound sums go through the queue: `statistics` (the statistics
    channel asked for; None: none is exchanged) under Gloo, or `horovod`, or an MPI that did not
    grant MPI_THREAD_MULTIPLE. 5 ms where the queue carries the gradient buckets alone (a few per
    step, megabytes each). Decided before the network is built, from the config: a job with
    `dist.batchnorm: sync` but no trainable BatchNorm keeps 1 ms under Gloo."""
    in_queue = statistics is not None and (gloo or statistics == "horovod" or not thread_multiple)
    return "1" if in_queue else "5"


def horovod_cycle_ms(environ) -> Optional[float]:
    """The cycle Horovod runs with under `environ`: HOROVOD_CYCLE_TIME, or its default where unset
    (1 ms since Horovod 0.21); None where the value is not a number."""
    text = environ.get("HOROVOD_CYCLE_TIME")
    if text is None:
        return 1.0
    try:
        return float(text)
    except ValueError:
        return None
