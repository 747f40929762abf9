"""Where a job is, counted in samples of the job: the one object that converts to and from
checkpoint metadata, and the split of the job's global batch over the ranks of this launch.

The global batch belongs to the job, not to a launch. It is fixed at the first launch
(`data.global_batch`, default `data.batch_size` x world size) and kept on any later world size:
each rank takes global_batch / world_size samples per step, in micro-batches of at most
`data.batch_size` whose gradients are accumulated. The number of steps per epoch, the learning
rate schedule and the samples each step takes then do not depend on the world size, so a job
preempted on 8 ranks continues on 4 or 2 as if it had not stopped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from distft.errors import CheckpointError, ConfigError


@dataclass
class TrainState:
    epoch: int = 0  # the epoch under way (or next to start)
    samples_in_epoch: int = 0  # samples of this epoch's permutation already trained on
    step: int = 0  # optimizer updates so far (global step)
    plan_epoch: int = 0  # the epoch whose freeze plan is in force
    world_size: int = 1  # ranks of the launch that wrote this state
    global_batch: int = 0  # samples per optimizer step, all ranks together

    @property
    def step_in_epoch(self) -> int:
        return self.samples_in_epoch // self.global_batch

    @property
    def samples(self) -> int:
        """Samples trained on since the job began."""
        return self.step * self.global_batch

    def advance(self) -> None:
        self.step += 1
        self.samples_in_epoch += self.global_batch

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.samples_in_epoch = epoch, 0

    def at_epoch_end(self, steps_per_epoch: int) -> "TrainState":
        """The state to record once this epoch's last step is done: the next epoch, at its start."""
        if self.step_in_epoch < steps_per_epoch:
            return self
        return TrainState(self.epoch + 1, 0, self.step, self.plan_epoch, self.world_size, self.global_batch)

    # --- a checkpoint's part -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Its part of a checkpoint's metadata (`epoch` and `world_size` also at the top level, where
        the first format kept them)."""
        return {"state": asdict(self), "epoch": self.epoch, "world_size": self.world_size}

    def load_state_dict(self, meta: dict, batch_size: int) -> None:
        """From a checkpoint's metadata (`from_meta`), in place."""
        for key, value in asdict(self.from_meta(meta, batch_size)).items():
            setattr(self, key, value)

    @classmethod
    def from_meta(cls, meta: dict, batch_size: int) -> "TrainState":
        """From a checkpoint's metadata: this format, or the first one (steps of the launch's
        global batch, which was `data.batch_size` x its world size)."""
        if "state" in meta:
            doc = meta["state"]
            try:
                return cls(**{k: int(doc[k]) for k in cls.__dataclass_fields__})
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint metadata: bad train state {doc!r} ({exc})") from None
        try:
            world = int(meta.get("world_size", 1))
            step_in_epoch = int(meta.get("step_in_epoch", 0))
            global_batch = batch_size * world
            return cls(epoch=int(meta.get("epoch", 0)), samples_in_epoch=step_in_epoch * global_batch,
                       step=int(meta.get("step", 0)), plan_epoch=int(meta.get("plan_epoch", meta.get("epoch", 0))),
                       world_size=world, global_batch=global_batch)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint metadata: cannot read the resume point ({exc})") from None


@dataclass(frozen=True)
class Batching:
    """How this launch takes the job's global batch: `per_rank` samples per rank and step, in
    `accumulate` micro-batches of `micro` samples."""

    global_batch: int
    world_size: int
    per_rank: int
    micro: int
    accumulate: int


def split_global_batch(global_batch: int, world_size: int, max_micro: int, last_world_size: int) -> Batching:
    """The micro-batches each rank takes so that `world_size` ranks together take exactly
    `global_batch` samples per step; the fewest micro-batches of at most `max_micro` samples."""
    if global_batch % world_size:
        fits = [w for w in range(1, min(global_batch, 4 * world_size) + 1) if global_batch % w == 0]
        raise ConfigError(
            f"data.global_batch: the job's global batch of {global_batch} samples (last launched on "
            f"{last_world_size} rank(s)) cannot be split evenly over {world_size} ranks; relaunch on a world "
            f"size that divides it (e.g. {', '.join(map(str, fits[-4:]))}), or start a new job (train.resume: false "
            f"or another train.output) with another data.global_batch")
    per_rank = global_batch // world_size
    accumulate = -(-per_rank // max_micro)
    while per_rank % accumulate:
        accumulate += 1
    return Batching(global_batch, world_size, per_rank, per_rank // accumulate, accumulate)
