"""Checkpoints as the job sees them: rank 0 reads and writes (the file format is
`checkpoint.py`), every rank learns the outcome (`agreement.agreed`), and a relaunch is checked
against the job that wrote the checkpoint.

Resume policy: the newest checkpoint that verifies is used; a corrupt newer one is skipped
with a warning. Checkpoints that exist but none of which can be used stop every rank with exit
2: starting over silently would overwrite the user's run.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Callable, Optional

import mxnet as mx

from distft.components import checkpoint
from distft import faults
from distft.distributed.agreement import agreed, from_rank0
from distft.config import as_yaml
from distft.console import log, warn
from distft.errors import CheckpointError, ConfigError, DataError, mxnet_reason
from distft.components.state import TrainState
from distft.launchenv import restart_record
from distft.runfolder import RunFolder


def job_identity(cfg) -> dict:
    """The keys that make a job what it is: a relaunch that changes one of them would train a
    different model, with another plan, optimizer or data order. Everything else (epochs,
    max_steps, the per-rank micro-batch, workers, logging, metrics, checkpoint cadence) may
    change between launches."""
    d = cfg.to_dict()
    keys = {
        "model.name": d["model"]["name"], "model.classes": d["model"]["classes"],
        "model.image_size": d["model"]["image_size"], "model.head": d["model"]["head"],
        "freeze.trainable": d["freeze"]["trainable"], "freeze.batchnorm": d["freeze"]["batchnorm"],
        "freeze.schedule": d["freeze"]["schedule"],
        "data.train": d["data"]["train"], "data.val_split": d["data"]["val_split"],
        "data.seed": d["data"]["seed"], "data.augment": d["data"]["augment"],
        "data.mean": d["data"]["mean"], "data.std": d["data"]["std"],
        "data.shards": "fixed" if cfg.fixed_shards else "reshuffled",
        "train.seed": d["train"]["seed"], "train.precision": d["train"]["precision"],
        "dist.batchnorm": d["dist"]["batchnorm"], "train.label_smoothing": d["train"]["label_smoothing"],
        "heads.grid": d["heads"]["grid"],
    }
    keys.update({f"optimizer.{k}": v for k, v in d["optimizer"].items()})
    if cfg.optimizer.lr_scaling == "linear":  # the scale is global batch / data.batch_size
        keys["data.batch_size"] = d["data"]["batch_size"]
    return keys


def check_relaunch(cfg, meta: dict, data_identity: Optional[dict] = None) -> None:
    """Refuse a relaunch that would continue the checkpoint's job as a different job: another
    config (`job_identity`), or another data.train (its files' names and sizes; data.on_change:
    accept lets it resume knowingly)."""
    recorded = meta.get("job")
    if not recorded:
        return  # the first checkpoint format: the freeze plan is still checked when weights load
    now = job_identity(cfg)
    for key, value in now.items():
        if key in recorded and recorded[key] != value:
            raise ConfigError(f"{key}: this job's checkpoints were written with {key}: {as_yaml(recorded[key])}; "
                              f"this launch asks for {as_yaml(value)}; a resumed job keeps it (use another "
                              "train.output, or train.resume: false to start over)")
    then = meta.get("data")
    if then and data_identity and then.get("digest") != data_identity["digest"] and cfg.data.on_change == "error":
        raise DataError(f"data.train: {cfg.data.train} has changed since this job's checkpoints were written "
                        f"({then.get('files')} files then, {data_identity['files']} now; names or sizes differ): a "
                        "resume would train on another data set; set data.on_change: accept to resume on it "
                        "knowingly, or start a new job (another train.output, or train.resume: false)")
    if cfg.data.global_batch and meta.get("state", {}).get("global_batch") not in (None, cfg.data.global_batch):
        raise ConfigError(f"data.global_batch: this job's checkpoints were written with a global batch of "
                          f"{meta['state']['global_batch']}, this launch asks for {cfg.data.global_batch}; a "
                          "resumed job keeps its global batch (leave data.global_batch unset to take it)")


class Checkpointer:
    """The job's checkpoints. Handed the job's stateful parts once (`track`): the train state,
    the weights and the optimizer, each with `state_dict()` / `load_state_dict()`; then `save`
    writes them when due (it owns the cadence) and `load` restores them from the checkpoint
    `find_resume_point` read.

    A part's state dict: `arrays` (NDArrays by name: the weights go to trainable.params, the
    optimizer's to optimizer.params), the rest to meta.json's top level. A part loads from rank
    0's arrays ({} on the other ranks) and the checkpoint's metadata (every rank), brings every
    rank to rank 0's state where it must, and returns the bytes it broadcast."""

    def __init__(self, cfg, world, ctx):
        self.cfg, self.world, self.ctx = cfg, world, ctx
        self.out = cfg.train.output
        self.loaded: Optional[checkpoint.Checkpoint] = None  # rank 0, until restored
        self.meta: Optional[dict] = None  # the checkpoint resumed from, on every rank
        self.bytes_control = 0
        # set by `track`
        self.state: Optional[TrainState] = None
        self.weights = self.optimizer = None
        self.data: Optional[dict] = None  # data.train's identity, kept with every checkpoint
        self.steps_per_epoch = self.total_steps = 0
        self.prepare: Optional[Callable[[TrainState], str]] = None
        self.together: Callable = contextlib.nullcontext
        self.events = None

    def track(self, state: TrainState, weights, optimizer, *, data: dict, steps_per_epoch: int, total_steps: int,
              prepare: Callable[[TrainState], str], together: Callable = contextlib.nullcontext,
              events=None) -> None:
        """The parts to save and restore. `prepare(at)`: bring every rank to the same state before
        rank 0 writes `at` (returns the state digest); `together`: the phase every rank enters
        (the watchdog's); `events`: where a written checkpoint is recorded (log.jsonl)."""
        self.state, self.weights, self.optimizer, self.data = state, weights, optimizer, data
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.prepare, self.together, self.events = prepare, together, events

    # --- resuming -------------------------------------------------------------------------------
    def find_resume_point(self) -> Optional[dict]:
        """The metadata of the checkpoint to resume from, on every rank (None: start afresh)."""
        restart = restart_record()  # relaunched by launch.sh --max-restarts: always from its last checkpoint
        if not self.cfg.train.resume and not restart:
            return None
        # train.resume: false started this job over: a relaunch takes only checkpoints it wrote since
        since = None if self.cfg.train.resume else float(restart.get("since") or 0.0)
        meta = from_rank0(self.world, agreed(self.world, "reading the checkpoints", lambda: self._read_latest(since)),
                          "distft.resume_meta")
        self.bytes_control += len(json.dumps(meta)) * (self.world.size - 1)
        self.meta = meta
        return meta

    def _read_latest(self, since: Optional[float]) -> Optional[dict]:
        skipped = []

        def skip(message: str) -> None:
            skipped.append(message)
            warn(self.world, message)

        self.loaded = checkpoint.latest(self.out, warn=skip, since=since)
        if self.loaded is not None:
            return self.loaded.meta
        if skipped:  # checkpoints exist and none verifies
            newest = skipped[0].removeprefix(checkpoint.SKIPPING)
            raise CheckpointError(
                f"train.output: none of the {len(skipped)} checkpoint(s) in {RunFolder(self.out).checkpoints} "
                f"can be used (newest: {newest}); to start over, set train.resume: false or remove them")
        return None

    def load(self) -> int:
        """The weights and the optimizer state of the checkpoint resumed from, on every rank (the
        train state was read from its metadata first: it decides the data and the plan).
        Returns the bytes broadcast."""
        if self.meta is None:
            return 0
        ckpt = self.loaded if self.world.rank == 0 else None
        sent = 0
        for part, arrays in ((self.weights, ckpt.params if ckpt else {}),
                             (self.optimizer, ckpt.optimizer if ckpt else {})):
            sent += part.load_state_dict({**self.meta, "arrays": arrays, "path": ckpt.path if ckpt else ""})
        self.loaded = None
        return sent

    # --- writing --------------------------------------------------------------------------------
    def steps_due(self) -> bool:
        """train.checkpoint_every_steps divides the step just taken."""
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and self.state.step % every == 0

    def due(self, boundary: bool) -> bool:
        """Whether a checkpoint is due now. Inside an epoch (`boundary` false: after a step):
        every train.checkpoint_every_steps steps, but a step that ends the epoch or the job
        waits for the boundary. At the end of an epoch's batches (after its validation): the
        job's end, train.checkpoint_every_steps, and every train.checkpoint_every_epochs
        epochs."""
        state, every_epochs = self.state, self.cfg.train.checkpoint_every_epochs
        if not boundary:
            return self.steps_due() and state.step_in_epoch < self.steps_per_epoch and state.step < self.total_steps
        epoch_done = state.step_in_epoch == self.steps_per_epoch
        epochs_due = bool(every_epochs) and (state.epoch + 1) % every_epochs == 0
        return state.step >= self.total_steps or (epoch_done and (epochs_due or self.steps_due()))

    def save(self, boundary: bool = False, force: bool = False) -> Optional[str]:
        """Write a checkpoint if one is due (`due`) or `force`d (a stop, a solve's end): the state
        after the last step (at an epoch's end: the next epoch, at its start). Rank 0 writes;
        every rank returns its path (None when none was due) or raises the same error."""
        if not (force or self.due(boundary)):
            return None
        at = self.state.at_epoch_end(self.steps_per_epoch)
        with self.together():
            digest = self.prepare(at)
            at.world_size = self.world.size
            path = agreed(self.world, f"writing the checkpoint of step {at.step}", lambda: self._write(at, digest)) \
                or os.path.join(RunFolder(self.out).checkpoints, f"ckpt-{at.step:08d}")
        if self.events is not None:
            self.events.event("checkpoint", step=at.step)
        return path

    def _write(self, at: TrainState, digest: str) -> str:
        weights, optimizer = self.weights.state_dict(), self.optimizer.state_dict()
        params, optimizer_arrays = weights.pop("arrays"), optimizer.pop("arrays")
        meta = {**at.state_dict(), "job": job_identity(self.cfg), "state_digest": digest,
                "model": self.cfg.model.name, "classes": self.cfg.model.classes, "data": self.data,
                **weights, **optimizer}
        delay = faults.checkpoint_delay()
        if delay:
            time.sleep(delay)
        try:
            path = checkpoint.save(self.out, at.step, params, optimizer_arrays, meta, self.cfg.train.keep_checkpoints)
        except (OSError, mx.base.MXNetError) as exc:
            kept = checkpoint.list_checkpoints(self.out)
            reason = getattr(exc, "strerror", None) or mxnet_reason(exc)
            free = shutil.disk_usage(self.out).free
            raise CheckpointError(
                f"train.output: writing the checkpoint of step {at.step} failed ({reason}; "
                f"{free:,} bytes free there); "
                + (f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists")
            ) from None
        log(self.world, f"checkpoint {path}")
        return path
