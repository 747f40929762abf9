"""Builders: the data (sets, sharding, loaders), the network as set up for a freeze plan
(grad_req, BatchNorm modes, synchronized BN, frozen prefix + trainable suffix, hybridization)
and the feature cache. Each takes the config and what it needs, and returns a part the
trainer wires in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distft.data import imaging
from distft.distributed import syncbn
from distft.models import freeze, network
from distft.distributed.agreement import agreed_everywhere
from distft.components.cache import FeatureCache
from distft.data.loader import BatchLoader
from distft.data.sets import data_digest, open_training_sets
from distft.data.sharding import ShardSampler
from distft.data.transforms import Transform
from distft.data.check import class_counts, without_unreadable
from distft.errors import ConfigError, DataError
from distft.runfolder import RunFolder
from distft.components.state import Batching


@dataclass
class DataSets:
    train: object
    val: Optional[object]
    class_names: Optional[list]
    identity: dict  # data.train's digest (names and sizes of its files) and file count
    inventory: dict  # per key: the files read, held out, unreadable and ignored, per class


def open_data(cfg, world, warn, holdout_by_position: bool = False) -> DataSets:
    """The data sets, read once and checked before any step: the model section (its name,
    head, input size and pretrained file, on every rank, before any data is read), classes by
    name (model.classes: auto is resolved here), the image decoder on every rank (a broken one
    is the environment's fault, named as such), the same data.train on every rank (by digest),
    every file's verdict (unreadable ones left out, or every rank stops past the limit)."""
    agreed_everywhere(world, "checking the model", lambda: network.check(cfg.model))
    agreed_everywhere(world, "testing the image decoder", imaging.self_test)  # before any file is judged
    train, val, names, cfg.model.classes = open_training_sets(cfg.data, cfg.model.classes, holdout_by_position)
    identity = data_digest(train)
    digests = [d.decode() for d in world.allgather_bytes(identity["digest"].encode(), "distft.data_digest")]
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise DataError(f"data.train: {cfg.data.train} is not the same data set on rank(s) {odd} as on rank 0 "
                        "(file names or sizes differ): every node must see the same files")
    inventory = {"data.train": {"files": identity["files"], "per_class": {}}}
    train = without_unreadable(train, "data.train", world, cfg.data, log=warn,
                               per_class=inventory["data.train"]["per_class"])
    if val is not None:
        key = "data.val_split" if cfg.data.val_split else "data.val"
        inventory[key] = {"files": len(val), "per_class": {}}
        val = without_unreadable(val, "data.val", world, cfg.data, log=warn,
                                 per_class=None if cfg.data.val_split else inventory[key]["per_class"])
        if cfg.data.val_split:  # held out of data.train: its classes are counted there
            inventory[key]["per_class"] = {n: {"files": c} for n, c in class_counts(val).items()}
    return DataSets(train, val, names, identity, inventory)


@dataclass
class Data:
    train_set: object
    sampler: Optional[ShardSampler]
    train_loader: BatchLoader
    val_loader: Optional[BatchLoader]
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        """A solve (no sampler) takes all of data.train at every step: one step per epoch."""
        return self.sampler.steps_per_epoch if self.sampler is not None else 1

    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()


def build_data(cfg, world, batching: Batching, sets: DataSets) -> Data:
    """The loaders, and the sampler of an SGD job (a solve, optimizer.name: lbfgs, takes all of
    data.train at every step, sharded by probe.py)."""
    train_set = sets.train
    sampler = None
    if cfg.optimizer.name != "lbfgs":
        sampler = ShardSampler(len(train_set), batching.per_rank, world.size, world.rank, cfg.data.seed,
                               fixed=cfg.fixed_shards)
        if sampler.steps_per_epoch == 0:
            raise ConfigError(f"data.global_batch: the global batch ({batching.global_batch} samples) is larger "
                              f"than data.train ({len(train_set)} samples)")
    transform = Transform(cfg.model.image_size, cfg.data.mean, cfg.data.std, cfg.data.augment, cfg.data.seed)
    bad = {"max_bad_fraction": cfg.data.max_bad_fraction, "max_bad_files": cfg.data.max_bad_files}
    train_loader = BatchLoader(train_set, transform, workers=cfg.data.workers, **bad)
    val_loader = None
    if sets.val is not None:
        val_loader = BatchLoader(sets.val, Transform(cfg.model.image_size, cfg.data.mean, cfg.data.std, False,
                                                     cfg.data.seed), workers=cfg.data.workers, **bad)
    total = (sampler.steps_per_epoch if sampler is not None else 1) * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    return Data(train_set, sampler, train_loader, val_loader, total)


@dataclass
class Network:
    """The network as set up for the freeze plan in force since `plan_epoch`."""

    plan: freeze.FreezePlan
    plan_epoch: int
    runner: network.SplitNet
    synchronized_bn: int  # BatchNorm layers synchronized across ranks (0: none)
    exchanges: Optional[object] = None  # their exchanges (distft.bnexchange), None without them

    @property
    def bn_channel(self) -> str:
        """How their statistics cross ranks (distft.bnchannel), "none" without them."""
        return self.exchanges.channel.name if self.exchanges is not None else "none"

    def local_stats(self, dist_bn: str) -> list[str]:
        """BatchNorm statistics that drift apart between ranks (`dist.batchnorm: local`)."""
        return self.plan.moving_state_names() if dist_bn == "local" else []


def build_network(cfg, world, net, spec, epoch: int, ctx) -> Network:
    """Resolve the freeze plan in force at `epoch` and set the network up for it."""
    sync = world.size > 1 and cfg.dist.batchnorm == "sync"
    plan = freeze.plan_at(cfg, spec, epoch, synchronized_bn=sync)
    freeze.apply(net, plan)
    moving_bn = [p for p, m in plan.bn_modes.items() if m != freeze.BN_FROZEN]
    exchanges = None
    if sync and moving_bn:
        exchanges = world.bn_exchanges(cfg.dist.bn_channel)
        syncbn.convert(net, moving_bn, exchanges)
    runner = network.SplitNet(net, plan.prefix, plan.suffix)
    if cfg.train.hybridize:
        runner.hybridize(ctx.device_type, keep_imperative=syncbn.is_sync)
    return Network(plan, epoch, runner, len(moving_bn) if sync else 0, exchanges)


def build_cache(cfg, network: Network, sampler: ShardSampler, rank: int) -> Optional[FeatureCache]:
    """A cache is valid for one frozen prefix: built anew whenever the plan changes."""
    if not (cfg.train.cache_features and network.plan.prefix):
        return None
    return FeatureCache(sampler.shard(), cfg.train.cache_dtype, cfg.train.cache_memory_bytes,
                        RunFolder(cfg.train.output).cache, rank)
