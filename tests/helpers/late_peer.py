"""Two MPI ranks sum through distft's MPI statistics channel; rank 1 comes `late` seconds after
rank 0. Rank 0 prints its wall and CPU seconds in the wait, and the sum (tests/multiprocess)."""
import sys
import time

import numpy as np
from mpi4py import MPI

from distft.distributed.bnchannel import MPIChannel

late = float(sys.argv[1])
channel = MPIChannel(MPI.COMM_WORLD)
rank = MPI.COMM_WORLD.Get_rank()
channel.allreduce(np.ones(4), "forward", "warm-up")  # both there: the first connection is made
MPI.COMM_WORLD.Barrier()
if rank == 1:
    time.sleep(late)
values = np.full(1025, rank + 1.0)
wall, cpu = time.perf_counter(), time.process_time()
channel.allreduce(values, "backward", "late")
if rank == 0:
    print(f"wall {time.perf_counter() - wall:.4f} cpu {time.process_time() - cpu:.4f} sum {values[0]:.1f} "
          f"{values[-1]:.1f}", flush=True)
