"""`distft train`: the job a config describes, set up and run on this world (one process, or the
ranks a launcher started)."""
from __future__ import annotations

from distft import allocator
from distft.components import probe
from distft.config import Config
from distft.distributed.world import init_world
from distft.train.job import Job
from distft.train.solving import SolvingJob


def run(cfg: Config, world=None) -> dict:
    allocator.return_freed_memory()  # before the network and the loader allocate
    with allocator.one_workspace_per_worker():  # before MXNet's first operator
        return _run(cfg, world)


def _run(cfg: Config, world) -> dict:
    # synchronized BNs and the solver's passes sum through the statistics channel (Horovod's cycle)
    statistics = cfg.dist.bn_channel if cfg.dist.batchnorm == "sync" or cfg.optimizer.name == probe.SOLVER else None
    world = world or init_world(stall_timeout=cfg.train.stall_timeout, statistics=statistics)
    job = (SolvingJob if cfg.optimizer.name == probe.SOLVER else Job)(cfg, world)
    try:
        return job.setup() or job.fit()
    finally:
        job.close()
