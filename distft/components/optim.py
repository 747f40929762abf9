"""The optimizer: gluon.Trainer over the trainable parameters with distft's gradient exchange in
place of a kvstore, and its state as one object (moments, per-parameter update counts, the loss
scale) that is captured, written, restored and sent to every rank together. The Trainer seam:
the only module that touches gluon.Trainer's private fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import mxnet as mx
from mxnet import gluon

from distft.distributed.agreement import agreed, from_rank0
from distft.distributed.exchange import GradientExchange, bucket_bytes_for
from distft.errors import CheckpointError

NO_DECAY = ("bias", "gamma", "beta")


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


def build_trainer(cfg, trainable: list, trainable_names: list[str], lr_mults: dict, exchange=None):
    """gluon.Trainer over `trainable` (named `trainable_names`), with distft's gradient exchange
    (None: the caller runs the exchange, as a grid does for all of its heads at once)."""
    for name, p in zip(trainable_names, trainable):
        leaf = name.rpartition(".")[2]
        p.wd_mult = 1.0 if cfg.optimizer.decay_bias_and_bn or leaf not in NO_DECAY else 0.0
        p.lr_mult = lr_mults.get(name, 1.0)
    opt = cfg.optimizer
    kwargs = {"learning_rate": opt.lr, "wd": opt.weight_decay}
    if opt.name in ("sgd", "nag"):
        kwargs["momentum"] = opt.momentum
    return Trainer(trainable, opt.name, kwargs, exchange)


def build_exchange(cfg, world, trainable: list, heads: int = 0, synchronized_bn: bool = False):
    """The fused gradient exchange over `trainable` (with `heads` per-head ballot slots);
    `synchronized_bn`: synchronized BatchNorm layers train (`bucket_bytes_for`)."""
    return GradientExchange(world, trainable, bucket_bytes_for(cfg.dist.bucket_bytes, synchronized_bn),
                            cfg.dist.compression, cfg.dist.gradient_predivide_factor, heads=heads)


def trained_params(trainer) -> list:
    """The Parameters the trainer updates, in its index order."""
    return list(trainer._params)  # noqa: SLF001


def trainer_lr_mults(trainer, names: dict) -> dict[str, float]:
    """As the optimizer holds them: structural name -> learning-rate multiplier."""
    opt = trainer._optimizer  # noqa: SLF001
    return {names[p]: float(opt.param_dict[i].lr_mult) for i, p in enumerate(trainer._params)}  # noqa: SLF001


def _leaves(state, out: list) -> None:
    if state is None:
        return
    if isinstance(state, (list, tuple)):
        for s in state:
            _leaves(s, out)
    else:
        out.append(state)


@dataclass
class OptimizerState:
    """Everything the optimizer carries from step to step, by structural parameter name:
    state leaves (`<param>#<leaf>` -> array: momentum, Adam's moments), update counts (Adam's
    bias correction) and the loss scale of float16 training."""

    arrays: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    loss_scale: dict = field(default_factory=dict)

    @classmethod
    def capture_all(cls, trainers: list, names: dict, loss_scale=None) -> "OptimizerState":
        """One state for several trainers (the heads of a grid): their parameters' names differ."""
        states = [cls.capture(t, names) for t in trainers]
        return cls({k: v for s in states for k, v in s.arrays.items()},
                   {k: v for s in states for k, v in s.counts.items()},
                   loss_scale.state() if loss_scale is not None else {})

    @classmethod
    def capture(cls, trainer, names: dict, loss_scale=None) -> "OptimizerState":
        updater = trainer._updaters[0]  # noqa: SLF001 - gluon keeps the optimizer state here
        opt = trainer._optimizer  # noqa: SLF001
        arrays, counts = {}, {}
        for index, param in enumerate(trainer._params):  # noqa: SLF001
            name = names[param]
            leaves: list = []
            _leaves(updater.states.get(index), leaves)
            for j, leaf in enumerate(leaves):
                arrays[f"{name}#{j}"] = leaf.as_in_context(mx.cpu())  # no copy when already there
            counts[name] = int(opt._index_update_count.get(index, 0))  # noqa: SLF001
        return cls(arrays, counts, loss_scale.state() if loss_scale is not None else {})

    def meta(self) -> dict:
        """What goes to the checkpoint's metadata (the arrays go to their own file)."""
        return {"update_counts": self.counts, "loss_scale": self.loss_scale}

    @classmethod
    def from_checkpoint(cls, arrays: dict, meta: dict) -> "OptimizerState":
        return cls(dict(arrays), dict(meta.get("update_counts") or {}), dict(meta.get("loss_scale") or {}))

    def restore(self, trainer, names: dict, only=None, loss_scale=None) -> None:
        """Load this state into `trainer`. `only`: restore just these Parameters (the others
        start fresh, as after unfreezing)."""
        updater = trainer._updaters[0]  # noqa: SLF001
        opt = trainer._optimizer  # noqa: SLF001
        for index, param in enumerate(trainer._params):  # noqa: SLF001
            if only is not None and param not in only:
                continue
            name = names[param]
            state = opt.create_state_multi_precision(index, param.list_data()[0])
            leaves: list = []
            _leaves(state, leaves)
            for j, leaf in enumerate(leaves):
                key = f"{name}#{j}"
                if key not in self.arrays:
                    raise CheckpointError(f"optimizer state for {name} is missing from the checkpoint "
                                          f"(was it written with another optimizer?)")
                if tuple(self.arrays[key].shape) != tuple(leaf.shape):
                    raise CheckpointError(f"optimizer state {key}: shape {tuple(self.arrays[key].shape)} "
                                          f"!= {tuple(leaf.shape)}")
                leaf[:] = self.arrays[key].as_in_context(leaf.context)
            updater.states[index] = state
            updater.states_synced[index] = True
            if self.counts.get(name):
                opt._index_update_count[index] = int(self.counts[name])  # noqa: SLF001
        if self.counts:
            opt.num_update = max([opt.num_update, *map(int, self.counts.values())])
        if loss_scale is not None and self.loss_scale:
            loss_scale.load(self.loss_scale)

    def share(self, world, trainer, names: dict) -> int:
        """Rank 0 holds the state (it read the checkpoint); afterwards every rank holds it.
        Counts and the loss scale travel as JSON, the leaves are broadcast into arrays shaped
        like the optimizer's own. Returns the bytes broadcast."""
        if world.size == 1:
            return 0
        doc = from_rank0(world, {"counts": self.counts, "loss_scale": self.loss_scale}, "distft.optimizer_meta")
        opt = trainer._optimizer  # noqa: SLF001
        arrays = {}
        for index, param in enumerate(trainer._params):  # noqa: SLF001
            leaves: list = []
            _leaves(opt.create_state_multi_precision(index, param.list_data()[0]), leaves)
            for j, leaf in enumerate(leaves):
                key = f"{names[param]}#{j}"
                if world.rank == 0 and key in self.arrays:  # read from the file, on the CPU
                    leaf[:] = self.arrays[key].as_in_context(leaf.context)
                arrays[key] = leaf
        sent = world.broadcast_(list(arrays.values()), "distft.optimizer_state") if arrays else 0
        # kept beside what is there: called once per trainer of a grid, on one state
        self.arrays, self.counts, self.loss_scale = {**self.arrays, **arrays}, doc["counts"], doc["loss_scale"]
        return sent


class Optimizers:
    """The optimizer state of a run's trainers (one per head) as one part of its checkpoints:
    `trainers` gives the trainers in force (new ones after a freeze-plan switch), `names`
    each Parameter's state name, `loss_scale` float16 training's scale (saved with them)."""

    def __init__(self, world, trainers: Callable[[], list], names: dict, loss_scale):
        self.world, self.trainers, self.names, self.loss_scale = world, trainers, names, loss_scale

    def state_dict(self) -> dict:
        """`arrays`: the state leaves (the checkpoint's optimizer file); the rest goes to its
        metadata: update counts, the loss scale, the learning rate of the last update."""
        trainers = self.trainers()
        state = OptimizerState.capture_all(trainers, self.names, self.loss_scale)
        return {"arrays": state.arrays, **state.meta(), "lr": float(trainers[0].learning_rate)}

    def load_state_dict(self, state: dict) -> int:
        """`state["arrays"]`: the leaves rank 0 read from the checkpoint ({} on the other ranks);
        the rest: its metadata, on every rank. Every rank ends with rank 0's state. Returns the
        bytes broadcast."""
        restored = OptimizerState.from_checkpoint(state["arrays"], state) if self.world.rank == 0 \
            else OptimizerState()
        sent = 0
        for trainer in self.trainers():
            agreed(self.world, "restoring the optimizer state",
                   lambda: restored.restore(trainer, self.names, loss_scale=self.loss_scale))
            sent += restored.share(self.world, trainer, self.names)
            restored.restore(trainer, self.names, loss_scale=self.loss_scale)
        return sent
