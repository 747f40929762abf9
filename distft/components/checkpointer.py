"""Checkpoints as the job sees them: rank 0 reads and writes (the file format is
`checkpoint.py`), every rank learns the outcome (`agreement.agreed`), and a relaunch is checked
against the job that wrote the checkpoint.

Resume policy: the newest checkpoint that verifies is used; a corrupt newer one is skipped
with a warning. Checkpoints that exist but none of which can be used stop every rank with exit
2: starting over silently would overwrite the user's run.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

import mxnet as mx

from distft.components import checkpoint
from distft import faults
from distft.distributed.agreement import agreed, from_rank0
from distft.config import as_yaml
from distft.console import log, warn
from distft.errors import CheckpointError, ConfigError, DataError, mxnet_reason
from distft.components.optim import OptimizerState
from distft.components.state import TrainState
from distft.models.network import set_weights
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
    def __init__(self, cfg, world, ctx):
        self.cfg, self.world, self.ctx = cfg, world, ctx
        self.out = cfg.train.output
        self.loaded: Optional[checkpoint.Checkpoint] = None  # rank 0, until restored
        self.bytes_control = 0

    # --- resuming -------------------------------------------------------------------------------
    def find_resume_point(self) -> Optional[dict]:
        """The metadata of the checkpoint to resume from, on every rank (None: start afresh)."""
        if not self.cfg.train.resume:
            return None
        meta = from_rank0(self.world, agreed(self.world, "reading the checkpoints", self._read_latest),
                          "distft.resume_meta")
        self.bytes_control += len(json.dumps(meta)) * (self.world.size - 1)
        return meta

    def _read_latest(self) -> Optional[dict]:
        skipped = []

        def skip(message: str) -> None:
            skipped.append(message)
            warn(self.world, message)

        self.loaded = checkpoint.latest(self.out, warn=skip)
        if self.loaded is not None:
            return self.loaded.meta
        if skipped:  # checkpoints exist and none verifies
            newest = skipped[0].removeprefix(checkpoint.SKIPPING)
            raise CheckpointError(
                f"train.output: none of the {len(skipped)} checkpoint(s) in {RunFolder(self.out).checkpoints} "
                f"can be used (newest: {newest}); to start over, set train.resume: false or remove them")
        return None

    def restore_weights(self, params: dict, state_names: list[str]) -> None:
        """Rank 0 puts the checkpoint's weights (`state_names`: what the plan trains, for every
        head) into the model; every rank learns if it could."""
        agreed(self.world, "restoring the checkpoint", lambda: self._restore_weights(params, state_names))

    def _restore_weights(self, params: dict, state_names: list[str]) -> None:
        ckpt = self.loaded
        want = set(state_names)
        have = set(ckpt.params)
        unknown = sorted(have - set(params))
        if unknown or not want <= have:
            missing = sorted(want - have)
            raise CheckpointError(
                f"{ckpt.path}: does not belong to this model/freeze plan"
                + (f"; not in {self.cfg.model.name}: {', '.join(unknown[:3])}" if unknown else "")
                + (f"; missing: {', '.join(missing[:3])}" if missing else ""))
        set_weights(params, ckpt.params, self.ctx, ckpt.path)

    def restore_optimizer(self, trainers: list, names: dict, loss_scale, meta: dict) -> int:
        """The optimizer state of the checkpoint on every rank, for each trainer (one per head).
        Returns bytes broadcast."""
        state = OptimizerState()
        if self.world.rank == 0:
            state = OptimizerState.from_checkpoint(self.loaded.optimizer, meta)
        sent = 0
        for trainer in trainers:
            agreed(self.world, "restoring the optimizer state",
                   lambda: state.restore(trainer, names, loss_scale=loss_scale))
            sent += state.share(self.world, trainer, names)
            state.restore(trainer, names, loss_scale=loss_scale)
        self.loaded = None
        return sent

    def restore_solver(self, solver, meta: dict) -> int:
        """A solve's state (optimizer.name: lbfgs: every head's L-BFGS machine) on every rank.
        Returns bytes broadcast."""
        arrays = self.loaded.optimizer if self.world.rank == 0 else {}
        agreed(self.world, "restoring the solver state", lambda: solver.check_state(arrays, meta))
        sent = solver.load_state_dict(self.world, arrays, meta)
        self.loaded = None
        return sent

    # --- writing --------------------------------------------------------------------------------
    def save(self, state: TrainState, params: dict, names_to_save: list[str], optimizer: OptimizerState,
             digest: str, extra: dict) -> str:
        """Rank 0 writes; every rank returns its path or raises the same error."""
        def write():
            arrays = {n: params[n].data().as_in_context(mx.cpu()) for n in names_to_save}  # copies only from a GPU
            meta = {**state.to_meta(), "epoch": state.epoch, "world_size": state.world_size,
                    "job": job_identity(self.cfg), **optimizer.meta(), "state_digest": digest, **extra}
            delay = faults.checkpoint_delay()
            if delay:
                time.sleep(delay)
            try:
                path = checkpoint.save(self.out, state.step, arrays, optimizer.arrays, meta,
                                       self.cfg.train.keep_checkpoints)
            except (OSError, mx.base.MXNetError) as exc:
                kept = checkpoint.list_checkpoints(self.out)
                reason = getattr(exc, "strerror", None) or mxnet_reason(exc)
                free = shutil.disk_usage(self.out).free
                raise CheckpointError(
                    f"train.output: writing the checkpoint of step {state.step} failed ({reason}; "
                    f"{free:,} bytes free there); "
                    + (f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists")
                ) from None
            log(self.world, f"checkpoint {path}")
            return path

        return agreed(self.world, f"writing the checkpoint of step {state.step}", write) or \
            os.path.join(RunFolder(self.out).checkpoints, f"ckpt-{state.step:08d}")
