"""The training loop. One step: batch -> frozen prefix (no autograd) -> trainable suffix under
autograd -> backward -> trainer.step (allreduce of trainable gradients, then the update).

Set-up order matters for multi-rank runs: every rank loads the pretrained file itself; rank 0
alone reads the checkpoint to resume from; every tensor is then verified by hash and only what
differs from rank 0 (normally: the state a resume read) is broadcast from rank 0.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from . import advice, checkpoint, dist, freeze, model, precision, syncbn
from .cache import FeatureCache
from .metrics import Metrics, end_progress_line, forward_probe
from .config import Config
from .data import BatchLoader, ShardSampler, Transform, eval_shard, open_training_sets
from .datacheck import without_unreadable
from .inputsize import require_fits
from .errors import CheckpointError, ConfigError, DistributedError, NumericalError, Preempted, \
    mxnet_reason
from .runfiles import write_run_files
from .schedule import LRSchedule


def log(world, msg: str) -> None:
    if world.rank == 0:
        end_progress_line()
        print(f"[distft] {msg}", flush=True)


# --- agreement between ranks -------------------------------------------------------------------


def state_digest(params: dict) -> str:
    """sha256 over every parameter and BN statistic, in structural-name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name].data().asnumpy()).tobytes())
    return h.hexdigest()


def check_same_config(world, cfg: Config) -> int:
    """Every rank must run the same job. The pretrained path may differ between nodes (its
    content is checked by the frozen-weight hashes)."""
    doc = cfg.to_dict()
    doc["model"].pop("pretrained")
    mine = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()
    everyone = world.allgather_bytes(mine, "distft.config")
    odd = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if odd:
        raise DistributedError(f"ranks {odd} run a different config from rank 0 (same --config and --set on every rank?)")
    return len(mine) * world.size


def differing_tensors(world, params: dict, names: list[str]) -> tuple[dict[str, list[int]], int]:
    """Hash each named tensor on every rank; returns ({name: ranks disagreeing with rank 0},
    bytes exchanged). One allgather of 8-byte digests, not of the tensors."""
    payload = b"".join(dist.digest(params[n].data().asnumpy()) for n in names)
    everyone = world.allgather_bytes(payload, "distft.state_digests")
    if any(len(d) != len(payload) for d in everyone):
        raise DistributedError("ranks hold different parameter sets (different model or freeze plan)")
    bad: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        for r, d in enumerate(everyone):
            if d[8 * i:8 * i + 8] != everyone[0][8 * i:8 * i + 8]:
                bad.setdefault(name, []).append(r)
    return bad, len(payload) * world.size


def agree_on_start_state(world, plan, params, on_frozen_mismatch: str, trainable_start: str) -> tuple[int, int]:
    """Make every rank hold rank 0's model before the first step, moving as few bytes as it can.

    Frozen tensors are verified by hash: a mismatch means ranks loaded different pretrained
    files, so the job stops (or, if asked, re-broadcasts them). Trainable state is either
    broadcast whole, or verified the same way with only the differing tensors broadcast (after a
    resume, where rank 0 alone read the checkpoint, that is whatever training changed).
    Returns (control bytes exchanged, tensor bytes broadcast)."""
    frozen = plan.frozen_names()
    trainable = plan.trainable_state_names()
    checked = frozen + (trainable if trainable_start == "verify" else [])
    bad, exchanged = differing_tensors(world, params, checked)
    bad_frozen = [n for n in frozen if n in bad]
    if bad_frozen and on_frozen_mismatch == "error":
        first = bad_frozen[0]
        raise DistributedError(
            f"frozen parameter {first} differs between ranks: rank(s) {bad[first]} disagree with rank 0"
            + (f" ({len(bad_frozen) - 1} more frozen tensors differ)" if len(bad_frozen) > 1 else "")
            + "; every rank must load the same pretrained file (model.pretrained), "
              "or set dist.on_frozen_mismatch: broadcast")
    if bad_frozen:
        log(world, f"warning: {len(bad_frozen)} frozen tensors differed between ranks (first {bad_frozen[0]}); "
                   "re-broadcast from rank 0")
    send = bad_frozen + (trainable if trainable_start == "broadcast" else [n for n in trainable if n in bad])
    return exchanged, world.broadcast_([params[n].data() for n in send], "distft.start_state") if send else 0


def check_rank_digests(world, params: dict, where: str) -> list[str]:
    mine = state_digest(params)
    digests = [d.decode() for d in world.allgather_bytes(mine.encode(), f"distft.digest.{where}")]
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise DistributedError(f"{where}: ranks {odd} hold a different model from rank 0 "
                               f"(state digest {digests[odd[0]][:12]} != {digests[0][:12]})")
    return digests


# --- pieces of the job -------------------------------------------------------------------------


@dataclass
class Stats:
    samples: int = 0
    steps: int = 0
    steady_seconds: float = 0.0
    steady_samples: int = 0
    data_seconds: float = 0.0
    compute_seconds: float = 0.0
    val_history: list = field(default_factory=list)
    bad_reported: int = 0
    first_step_at: float = 0.0
    epochs: list = field(default_factory=list)  # per epoch: steps, seconds of data wait + steps


def build_trainer(cfg: Config, world, params: dict, plan, lr_mults: dict):
    trainable = {n: params[n] for n in plan.trainable_names()}
    for name, p in trainable.items():
        leaf = name.rpartition(".")[2]
        p.wd_mult = 1.0 if cfg.optimizer.decay_bias_and_bn or leaf not in ("bias", "gamma", "beta") else 0.0
        p.lr_mult = lr_mults.get(name, 1.0)
    opt = cfg.optimizer
    kwargs = {"learning_rate": opt.lr, "wd": opt.weight_decay}
    if opt.name in ("sgd", "nag"):
        kwargs["momentum"] = opt.momentum
    exchange = dist.GradientExchange(world, list(trainable.values()), cfg.dist.bucket_bytes,
                                     cfg.dist.compression, cfg.dist.gradient_predivide_factor)
    # gluon.Trainer wants a ParameterDict or list; keep structural order for a stable index
    trainer = dist.Trainer(list(trainable.values()), opt.name, kwargs, exchange)
    return trainer, exchange


def sync_optimizer_state(world, trainer) -> int:
    """Broadcast every optimizer state leaf from rank 0 (after a resume on rank 0)."""
    if world.size == 1:
        return 0
    updater = trainer._updaters[0]  # noqa: SLF001
    opt = trainer._optimizer  # noqa: SLF001
    leaves = []
    for index, param in enumerate(trainer._params):  # noqa: SLF001
        if index not in updater.states:
            updater.states[index] = opt.create_state_multi_precision(index, param.list_data()[0])
            updater.states_synced[index] = True
        checkpoint._leaves(updater.states[index], leaves)  # noqa: SLF001
    return world.broadcast_(leaves, "distft.optimizer_state") if leaves else 0


def average_moving_stats(world, params: dict, plan, dist_bn: str) -> None:
    """`local` BatchNorm: running statistics differ per rank; average them so all ranks agree."""
    names = plan.moving_state_names()
    if world.size > 1 and names and dist_bn == "local":
        world.allreduce_([params[n].data() for n in names], "distft.bn_stats", average=True)
        mx.nd.waitall()


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(world, runner, loader: BatchLoader, batch_size: int, ctx, loss_fn, beat=lambda: None) -> dict:
    idx = eval_shard(len(loader.dataset), world.size, world.rank)
    sums = np.zeros(4)  # top1, top5, loss, count
    for start in range(0, len(idx), batch_size):
        beat()
        x, y = loader.batch(idx[start:start + batch_size], epoch=0)
        out = precision.to_float32(runner(mx.nd.array(x, ctx=ctx)))
        loss = loss_fn(out, mx.nd.array(y, ctx=ctx)).asnumpy()
        logits = out.asnumpy()
        sums += [topk_correct(logits, y, 1), topk_correct(logits, y, 5), loss.sum(), len(y)]
    total = world.allreduce_numpy(sums, "distft.eval")
    n = max(total[3], 1)
    return {"val_top1": total[0] / n, "val_top5": total[1] / n, "val_loss": total[2] / n,
            "val_samples": int(total[3])}


# --- the job -----------------------------------------------------------------------------------


class Job:
    def __init__(self, cfg: Config, world):
        self.cfg, self.world = cfg, world
        self.ctx = world.context()
        self.out = cfg.train.output
        self.bytes_broadcast = 0
        self.bytes_control = 0
        self.switches: list = []
        self.cache = None
        self.skipped_steps = 0
        self.stop_requested = False
        self.pending_check = None  # (sums of squares, loss, (step, epoch)) not read yet
        self.finished = False
        self.heartbeat = time.monotonic()

    # set-up ------------------------------------------------------------------------------------
    def prepare_output(self) -> None:
        if self.world.rank == 0:
            try:
                os.makedirs(self.out, exist_ok=True)
                probe = os.path.join(self.out, f".write-test-{os.getpid()}")
                open(probe, "w").close()
                os.remove(probe)
            except OSError as exc:
                raise ConfigError(f"train.output: {self.out}: cannot write there ({exc.strerror})") from None
        # config.yaml and classes.json: written by write_run_files once every check has passed

    def load_resume_point(self) -> Optional[checkpoint.Checkpoint]:
        """Rank 0 reads the newest valid checkpoint; every rank learns its meta."""
        ckpt = None
        if self.cfg.train.resume and self.world.rank == 0:
            ckpt = checkpoint.latest(self.out, warn=lambda m: log(self.world, f"warning: {m}"))
        meta = json.dumps(ckpt.meta if ckpt else None).encode()
        shared = self.world.allgather_bytes(meta if self.world.rank == 0 else b"", "distft.resume_meta")[0]
        self.bytes_control += len(shared) * (self.world.size - 1)
        self.resume_meta = json.loads(shared)
        return ckpt

    def build_data(self) -> None:
        cfg = self.cfg
        require_fits(cfg.model.name, cfg.model.image_size)  # before reading any data
        self.train_set, val_set, self.class_names, cfg.model.classes = open_training_sets(cfg.data, cfg.model.classes)
        # every file read once before training (verdicts cached): too many bad ones stop every
        # rank here; a few are left out of the data sets
        warn = lambda message: log(self.world, message)  # noqa: E731
        self.train_set = without_unreadable(self.train_set, "data.train", self.world, cfg.data, log=warn)
        if val_set is not None:
            val_set = without_unreadable(val_set, "data.val", self.world, cfg.data, log=warn)
        self.sampler = ShardSampler(len(self.train_set), cfg.data.batch_size, self.world.size,
                                    self.world.rank, cfg.data.seed, fixed=cfg.fixed_shards)
        if self.sampler.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size: the global batch ({cfg.data.batch_size} x {self.world.size} "
                              f"ranks) is larger than data.train ({len(self.train_set)} samples)")
        self.train_loader = BatchLoader(self.train_set, Transform(cfg.model.image_size, cfg.data.mean, cfg.data.std,
                                                                  cfg.data.augment, cfg.data.seed),
                                        workers=cfg.data.workers, max_bad_fraction=cfg.data.max_bad_fraction,
                                        max_bad_files=cfg.data.max_bad_files)
        self.val_loader = None
        if val_set is not None:
            self.val_loader = BatchLoader(val_set, Transform(cfg.model.image_size, cfg.data.mean, cfg.data.std,
                                                             False, cfg.data.seed), workers=cfg.data.workers,
                                          max_bad_fraction=cfg.data.max_bad_fraction,
                                          max_bad_files=cfg.data.max_bad_files)
        spe = self.sampler.steps_per_epoch
        self.total_steps = spe * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def build_cache(self) -> None:
        """A cache is valid for one frozen prefix: (re)built whenever the plan changes."""
        if self.cache is not None:
            self.cache.close()
        self.cache = None
        if self.cfg.train.cache_features and self.plan.prefix:
            self.cache = FeatureCache(self.sampler.shard(), self.cfg.train.cache_dtype,
                                      self.cfg.train.cache_memory_bytes, os.path.join(self.out, "cache"),
                                      self.world.rank)

    def configure(self, epoch: int) -> None:
        """Resolve the freeze plan in force at `epoch` and set the network up for it: grad_req,
        BatchNorm modes, synchronized BN, the prefix/suffix split, hybridization, optimizer."""
        cfg = self.cfg
        sync = self.world.size > 1 and cfg.dist.batchnorm == "sync"
        self.plan = freeze.resolve(self.spec, cfg.freeze.trainable, cfg.freeze.batchnorm,
                                   cfg.freeze.schedule, epoch, synchronized_bn=sync)
        self.plan_epoch = epoch
        freeze.apply(self.net, self.plan)
        moving_bn = [p for p, m in self.plan.bn_modes.items() if m != freeze.BN_FROZEN]
        if sync:
            syncbn.convert(self.net, moving_bn, self.world)
        # read each step's finiteness check one step late, letting the gradient exchange
        # overlap the next batch (see train_step). Not with a synchronized BN: its backward
        # waits for its own allreduce inside an engine operation, and with the previous
        # step's exchange still in flight 2 ranks deadlocked (seen on 2 cores, one engine
        # worker thread each)
        self.deferred_check = (cfg.train.on_nonfinite == "error" and not self.loss_scale.dynamic
                               and not (sync and moving_bn))
        self.runner = model.SplitNet(self.net, self.plan.prefix, self.plan.suffix)
        self.build_cache()
        if cfg.train.hybridize:
            unreliable_bn = model.cached_batchnorm_is_unreliable(self.ctx.device_type)
            self.runner.hybridize(keep_imperative=lambda b: syncbn.is_sync(b) or (
                unreliable_bn and model.is_training_batchnorm(b)))

    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        self.build_data()  # first: it resolves model.classes (auto) for the model
        self.prepare_output()
        self.metrics = Metrics(cfg.metrics, world, self.out, cfg.train.log_every)
        self.metrics.start()
        self.bytes_control += check_same_config(world, cfg)
        self.compute_dtype = precision.enable(cfg.train.precision, self.ctx)  # before the model is built
        self.loss_scale = precision.LossScale(self.compute_dtype)
        self.net = model.create(cfg.model, self.ctx, seed=cfg.train.seed)
        self.spec = model.describe(self.net, cfg.model.name, cfg.model.head)
        self.params = model.structural_params(self.net)
        self.names = {p: n for n, p in self.params.items()}
        ckpt = self.load_resume_point()
        meta = self.resume_meta or {}
        self.epoch = int(meta.get("epoch", 0))
        self.step_in_epoch = int(meta.get("step_in_epoch", 0))
        self.global_step = int(meta.get("step", 0))
        # the freeze plan in force when the checkpoint was written (a checkpoint at an epoch
        # boundary precedes that epoch's unfreezing, which fit() then applies)
        self.configure(int(meta.get("plan_epoch", self.epoch)))
        if ckpt is not None:
            self.restore_weights(ckpt)
        exchanged, sent = agree_on_start_state(world, self.plan, self.params, cfg.dist.on_frozen_mismatch,
                                               cfg.dist.trainable_start)
        self.bytes_control += exchanged
        self.bytes_broadcast += sent
        self.lr_mults = freeze.lr_multipliers(self.spec, cfg.optimizer.lr_mult)
        self.trainer, self.exchange = build_trainer(cfg, world, self.params, self.plan, self.lr_mults)
        if ckpt is not None:
            checkpoint.restore_optimizer_state(self.trainer, self.names, ckpt.optimizer, meta.get("update_counts", {}))
        if self.resume_meta:
            self.bytes_broadcast += sync_optimizer_state(world, self.trainer)
        self.schedule = LRSchedule.from_config(cfg.optimizer, self.sampler.steps_per_epoch, self.total_steps,
                                               world.size)
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        self.forward_rate = forward_probe(self.runner, self.ctx, cfg.data.batch_size, cfg.model.image_size,
                                          cfg.metrics.probe_batches)
        t = self.plan.totals()
        if world.rank == 0:  # every check has passed: now the run folder may change
            write_run_files(self.out, cfg, self.class_names, cfg.model.classes)
        for warning in advice.warnings(cfg, self.plan, self.sampler.steps_per_epoch, len(self.train_set)):
            log(world, f"warning: {warning}")
        self.metrics.startup(t, self.bytes_broadcast + self.bytes_control, self.forward_rate)
        log(world, f"{cfg.model.name}: {t['trainable_params']:,} trainable / {t['frozen_params']:,} frozen params; "
                   f"frozen prefix {len(self.plan.prefix)} stages; {world.size} rank(s) [{world.backend}], "
                   f"global batch {self.sampler.global_batch}, {self.sampler.steps_per_epoch} steps/epoch")
        if ckpt is not None:
            log(world, f"resumed from {ckpt.path} (epoch {self.epoch}, step {self.global_step})")

    def restore_weights(self, ckpt: checkpoint.Checkpoint) -> None:
        want = set(self.plan.trainable_state_names())
        have = set(ckpt.params)
        unknown = sorted(have - set(self.params))
        if unknown or not want <= have:
            missing = sorted(want - have)
            raise CheckpointError(
                f"{ckpt.path}: does not belong to this model/freeze plan"
                + (f"; not in {self.cfg.model.name}: {', '.join(unknown[:3])}" if unknown else "")
                + (f"; missing: {', '.join(missing[:3])}" if missing else ""))
        for name, arr in ckpt.params.items():
            p = self.params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise CheckpointError(f"{ckpt.path}: {name} has shape {tuple(arr.shape)}, the model {tuple(p.shape)}")
            p.set_data(arr.as_in_context(self.ctx))

    # checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        self.settle()
        self.check_weights()
        average_moving_stats(self.world, self.params, self.plan, self.cfg.dist.batchnorm)
        self.digests = check_rank_digests(self.world, self.params, f"checkpoint at step {self.global_step}")
        if self.world.rank != 0:
            return
        names = self.plan.trainable_state_names()
        arrays = {n: self.params[n].data().as_in_context(mx.cpu()) for n in names}  # copies only from a GPU
        opt_arrays, counts = checkpoint.optimizer_state(self.trainer, self.names)
        meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "model": self.cfg.model.name,
                "classes": self.cfg.model.classes, "world_size": self.world.size,
                "plan_epoch": self.plan_epoch,
                "lr": self.schedule(max(self.global_step - 1, 0)), "update_counts": counts,
                "state_digest": self.digests[0]}
        try:
            path = checkpoint.save(self.out, self.global_step, arrays, opt_arrays, meta,
                                   self.cfg.train.keep_checkpoints)
        except (OSError, mx.base.MXNetError) as exc:
            kept = checkpoint.list_checkpoints(self.out)
            reason = getattr(exc, "strerror", None) or mxnet_reason(exc)
            free = shutil.disk_usage(self.out).free
            raise CheckpointError(
                f"train.output: writing the checkpoint of step {self.global_step} failed ({reason}; "
                f"{free:,} bytes free there); "
                + (f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists")
            ) from None
        log(self.world, f"checkpoint {path}")

    # the loop ----------------------------------------------------------------------------------
    def features_for(self, idx, x):
        """The frozen prefix's output: from the feature cache, or computed (inference mode,
        nothing recorded) and, with the cache on, kept."""
        if self.cache is not None and self.cache.has_all(idx):
            return mx.nd.array(self.cache.get(idx), ctx=self.ctx)
        # float32 at the seam, as cached features are: under AMP a low-precision leaf given an
        # input gradient (FreezePlan.input_grad) fails MXNet's backward shape inference
        features = precision.to_float32(self.runner.features(mx.nd.array(x, ctx=self.ctx)))
        if self.cache is not None:
            self.cache.put(idx, features.asnumpy())
        return features

    def train_step(self, features, y, lr: float) -> float:
        """One step. In the default mode (train.on_nonfinite: error, no float16 loss scaling)
        nothing here waits for the gradient allreduce: the update is queued behind it, and the
        finiteness check of this step's averaged gradients is read at the next step (`settle`),
        so the exchange overlaps the next batch. `skip` and float16 loss scaling must decide
        before updating, so they wait."""
        self.trainer.set_learning_rate(lr)
        if self.plan.input_grad:
            features.attach_grad()  # so backward reaches a statistics-only BN (see FreezePlan)
        scale = self.loss_scale.scale
        with autograd.record():
            loss = self.loss_fn(self.runner.suffix(features), y)
            scaled = loss * scale if scale != 1.0 else loss
        scaled.backward()
        self.trainer.allreduce_grads()  # trainable gradients only, fused buckets
        grads = [p.list_grad()[0] for p in self.trainer._params]  # noqa: SLF001
        # one fused reduction: the sum of squares of each averaged gradient (queued, not read)
        sums = mx.nd.multi_sum_sq(*grads, num_arrays=len(grads)) if grads else None
        where = (self.global_step + 1, self.epoch)
        if self.deferred_check:
            self.trainer.update(self.cfg.data.batch_size)
            loss_value = float(loss.mean().asscalar())
            self.settle()  # the previous step's check: computed by now
            self.pending_check = (sums, loss_value, where)
            if not np.isfinite(loss_value):
                self.settle()
            return loss_value
        self.exchange.wait()
        loss_value = float(loss.mean().asscalar())
        if self.finite(sums, loss_value, where):
            self.trainer.update(self.cfg.data.batch_size * scale)  # also undoes the loss scale
            self.loss_scale.stepped()
        return loss_value

    def check_weights(self) -> None:
        """Finite gradients can still make non-finite weights (a huge learning rate): such a
        model never reaches a checkpoint."""
        weights = [p.data() for p in self.trainer._params]  # noqa: SLF001
        if not weights:
            return
        sums = mx.nd.multi_sum_sq(*weights, num_arrays=len(weights)).asnumpy()
        bad = [self.names[p] for p, v in zip(self.trainer._params, sums) if not np.isfinite(v)]  # noqa: SLF001
        if bad:
            raise NumericalError(f"step {self.global_step} (epoch {self.epoch}): non-finite weights in "
                                 f"{', '.join(bad[:5])} after the update; checkpoint not written, the previous "
                                 "one is intact (lower optimizer.lr)")

    def settle(self) -> None:
        """Read the pending finiteness check (a no-op when none is pending). Everything that
        reads or writes the weights (checkpoints, evaluation, the end, a freeze-plan switch)
        settles first, so a non-finite update never reaches a file."""
        if self.pending_check is None:
            return
        pending, self.pending_check = self.pending_check, None
        start = time.perf_counter()
        self.finite(*pending)
        self.exchange.seconds_total += time.perf_counter() - start  # waited on the exchange

    def finite(self, sums, loss_value: float, where: tuple) -> bool:
        """NaN/Inf in the loss or the allreduced gradients (the same on every rank after the
        allreduce, so all ranks decide alike): stop, or skip the update."""
        per_tensor = sums.asnumpy() if sums is not None else np.zeros(0)
        if np.isfinite(loss_value) and np.isfinite(per_tensor).all():
            return True
        names = [self.names[p] for p, v in zip(self.trainer._params, per_tensor)  # noqa: SLF001
                 if not np.isfinite(v)]
        if self.loss_scale.dynamic and np.isfinite(loss_value):
            # float16 gradients overflowed at this loss scale: the usual AMP step, not an error
            self.loss_scale.overflowed()
            return False
        step, epoch = where
        # the check reads each gradient's sum of squares: NaN/Inf, or values beyond ~1e19
        what = f"loss {loss_value}" + (f"; non-finite gradient norms in {', '.join(names[:5])}"
                                       + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "")
        if self.cfg.train.on_nonfinite == "error":
            raise NumericalError(f"step {step} (epoch {epoch}): {what} "
                                 "(lower optimizer.lr, or set train.on_nonfinite: skip)")
        self.skipped_steps += 1
        self.metrics.skipped(1)
        log(self.world, f"warning: step {step} (epoch {epoch}): {what}; update skipped ({self.skipped_steps} so far)")
        return False

    # preemption and hangs -----------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_term(signum, frame):  # noqa: ARG001
            if self.stop_requested:
                return
            self.stop_requested = True
            grace = self.cfg.train.preempt_grace

            def deadline():
                time.sleep(grace)
                print(f"distft: error (rank {self.world.rank}): SIGTERM {grace:g} s ago and no clean stop "
                      "(train.preempt_grace): a peer rank is gone; exiting, the last completed checkpoint "
                      "is intact", file=sys.stderr, flush=True)
                os._exit(143)

            threading.Thread(target=deadline, name="distft-preempt-deadline", daemon=True).start()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)

    def agreed_to_stop(self) -> bool:
        """Every rank learns whether any rank was asked to stop, at the same step: the vote
        travels with the step's gradient allreduce (a collective of its own only when no
        gradients were exchanged)."""
        if self.world.size == 1:
            return self.stop_requested
        # the vote of the step before when the exchange is left to overlap (one step later,
        # the same step on every rank)
        voted = self.exchange.any_voted(lag=1 if self.deferred_check else 0)
        if voted is not None:
            return voted
        return bool(self.world.allreduce_numpy(np.array([float(self.stop_requested)]), "distft.stop")[0] > 0)

    def start_watchdog(self) -> None:
        timeout = self.cfg.train.stall_timeout
        if not timeout:
            return

        def watch():
            while not self.finished:
                time.sleep(min(1.0, timeout / 4))
                idle = time.monotonic() - self.heartbeat
                if idle > timeout and not self.finished:
                    print(f"distft: error (rank {self.world.rank}): no progress for {idle:.0f} s "
                          f"(train.stall_timeout {timeout:g} s): a rank is hung or a collective never "
                          f"completed; Horovod's stall report above names the missing ranks",
                          file=sys.stderr, flush=True)
                    os._exit(5)

        threading.Thread(target=watch, name="distft-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def fit(self) -> dict:
        cfg, world, stats = self.cfg, self.world, Stats()
        spe = self.sampler.steps_per_epoch
        self.install_signal_handlers()
        self.beat()
        self.start_watchdog()
        every_steps = cfg.train.checkpoint_every_steps
        evals: dict = {}
        wall_start = time.perf_counter()
        start_epoch = self.epoch
        for epoch in range(start_epoch, cfg.train.epochs):
            if self.global_step >= self.total_steps:
                break
            if any(self.plan_epoch < s["epoch"] <= epoch for s in cfg.freeze.schedule):
                self.reconfigure(epoch)
            self.epoch = epoch
            first = self.step_in_epoch if epoch == start_epoch else 0
            last = min(spe, first + self.total_steps - self.global_step)
            perm = self.sampler.permutation(epoch)
            plan = [(s, self.sampler.indices(epoch, s, perm)) for s in range(first, last)]
            t_wait = time.perf_counter()
            epoch_seconds, epoch_steps = 0.0, 0  # data wait + steps of this epoch
            skip = self.cache.has_all if self.cache is not None else None
            for step, idx, x, y in self.train_loader.iterate(plan, epoch, skip=skip):
                t0 = time.perf_counter()
                stats.data_seconds += t0 - t_wait
                lr = self.schedule(self.global_step)
                exchanged = self.exchange.seconds_total
                self.exchange.vote(self.stop_requested)
                loss = self.train_step(self.features_for(idx, x), mx.nd.array(y, ctx=self.ctx), lr)
                t1 = time.perf_counter()
                stats.compute_seconds += t1 - t0
                epoch_seconds += t1 - t_wait
                epoch_steps += 1
                self.metrics.step(samples=self.sampler.batch_size, seconds=t1 - t0, data=t0 - t_wait,
                                  allreduce=self.exchange.seconds_total - exchanged,
                                  allreduce_bytes=self.exchange.bytes_per_step, loss=loss, lr=lr, epoch=epoch)
                self.metrics.bad(self.train_loader.bad - stats.bad_reported)
                stats.bad_reported = self.train_loader.bad
                self.global_step += 1
                stats.steps += 1
                stats.samples += self.sampler.global_batch
                if stats.steps == 1:
                    stats.first_step_at = time.time()
                if stats.steps > 1:  # the first step builds graphs and allocates: not counted
                    stats.steady_seconds += t1 - t_wait  # data wait + step; not eval or checkpoints
                    stats.steady_samples += self.sampler.global_batch
                if self.global_step % cfg.train.log_every == 0 or step == last - 1:
                    record = self.metrics.window(global_step=self.global_step, total_steps=self.total_steps,
                                                 epoch=epoch, loss=loss, lr=lr)
                    if not self.metrics.shows_progress:
                        log(world, f"epoch {epoch} step {step + 1}/{spe} loss {loss:.4f} lr {lr:.4g} "
                                   f"samples/s {record['samples_per_sec']:.1f}")
                if every_steps and self.global_step % every_steps == 0 and step != last - 1:
                    self.save_checkpoint(epoch, step + 1)
                if self.agreed_to_stop():
                    self.stop_at(epoch, step + 1, spe)
                self.beat()
                t_wait = time.perf_counter()
            self.step_in_epoch = 0
            finished_epoch = last == spe
            stats.epochs.append({"epoch": epoch, "steps": epoch_steps, "seconds": epoch_seconds,
                                 "samples_per_sec": epoch_steps * self.sampler.global_batch / epoch_seconds
                                 if epoch_seconds else None})
            if self.val_loader is not None:
                evals = self.validate()
                log(world, f"epoch {epoch} val top1 {evals['val_top1']:.4f} top5 {evals['val_top5']:.4f} "
                           f"loss {evals['val_loss']:.4f}")
                self.metrics.evaluation(evals, epoch)
                stats.val_history.append({"epoch": epoch, **evals})
            done = self.global_step >= self.total_steps
            due = bool(cfg.train.checkpoint_every_epochs) and (epoch + 1) % cfg.train.checkpoint_every_epochs == 0
            due = due or bool(every_steps) and self.global_step % every_steps == 0
            if finished_epoch and (due or done):
                self.save_checkpoint(epoch + 1, 0)
            elif done:  # train.max_steps ended the run inside an epoch
                self.save_checkpoint(epoch, last)
        if not evals and self.val_loader is not None:  # resumed a finished run: still report
            evals = self.validate()
        return self.finish(stats, evals, time.perf_counter() - wall_start)

    def validate(self) -> dict:
        """Top-1/top-5 over data.val, each rank its shard; `local` BN statistics averaged first
        so every rank evaluates the same model."""
        self.settle()
        average_moving_stats(self.world, self.params, self.plan, self.cfg.dist.batchnorm)
        return evaluate(self.world, self.runner, self.val_loader,
                        self.cfg.data.val_batch_size or self.cfg.data.batch_size, self.ctx, self.loss_fn, self.beat)

    def stop_at(self, epoch: int, next_step: int, spe: int) -> None:
        """Preemption: checkpoint at this step boundary (all ranks) and leave with code 75."""
        if next_step == spe:
            self.save_checkpoint(epoch + 1, 0)
        else:
            self.save_checkpoint(epoch, next_step)
        self.finished = True
        raise Preempted(f"preempted (SIGTERM) at step {self.global_step}; checkpoint written; "
                        "run the same command again to resume")

    def reconfigure(self, epoch: int) -> None:
        """Gradual unfreezing at an epoch boundary, at the same step on every rank: grad_req,
        BN modes, sync BN, the prefix split and the cached graphs follow the new plan; the
        optimizer takes the new parameters with fresh state and keeps the state of the others.
        Nothing is broadcast: newly trainable tensors were frozen, hence verified identical."""
        self.settle()
        old = set(self.plan.trainable_names())
        opt_arrays, counts = checkpoint.optimizer_state(self.trainer, self.names)
        self.configure(epoch)
        new = set(self.plan.trainable_names())
        self.trainer, self.exchange = build_trainer(self.cfg, self.world, self.params, self.plan, self.lr_mults)
        checkpoint.restore_optimizer_state(self.trainer, self.names, opt_arrays, counts,
                                           only={self.params[n] for n in new & old})
        digests = check_rank_digests(self.world, self.params, f"freeze-plan switch at epoch {epoch}")
        self.switches.append({"epoch": epoch, "step": self.global_step, "trainable_tensors": len(new),
                              "unfrozen": sorted(new - old), "refrozen": sorted(old - new),
                              "rank_state_digests": digests})
        log(self.world, f"epoch {epoch}: freeze plan now trains {len(new)} tensors "
                        f"(+{len(new - old)} / -{len(old - new)})")

    def finish(self, stats: Stats, evals: dict, wall: float) -> dict:
        world = self.world
        self.settle()
        average_moving_stats(world, self.params, self.plan, self.cfg.dist.batchnorm)
        digests = check_rank_digests(world, self.params, "end of training")
        rss = [int(b) for b in (x.decode() for x in world.allgather_bytes(
            str(peak_rss_bytes()).encode(), "distft.rss"))]
        t = self.plan.totals()
        rate = stats.steady_samples / stats.steady_seconds if stats.steady_seconds else (
            stats.samples / wall if wall else 0.0)
        summary = {
            "model": self.cfg.model.name, "classes": self.class_names or [str(i) for i in range(self.cfg.model.classes)],
            "epochs": round(self.global_step / self.sampler.steps_per_epoch, 3),
            "steps": self.global_step, "steps_this_run": stats.steps, "samples_per_sec": rate,
            "samples_per_sec_per_rank": rate / world.size, "wall_seconds": wall,
            "data_wait_seconds": stats.data_seconds, "compute_seconds": stats.compute_seconds,
            **{k: evals.get(k) for k in ("val_top1", "val_top5", "val_loss")},
            "trainable_params": t["trainable_params"], "frozen_params": t["frozen_params"],
            "trainable_bytes": t["trainable_bytes"], "frozen_bytes": t["frozen_bytes"],
            "frozen_prefix": self.plan.prefix,
            "world_size": world.size, "backend": world.backend,
            # what start-up moved: trainable state, plus control traffic (config and frozen
            # weight hashes, resume point)
            "bytes_broadcast": self.bytes_broadcast + self.bytes_control,
            "bytes_broadcast_trainable": self.bytes_broadcast,
            "bytes_control": self.bytes_control,
            "bytes_full_broadcast": t["total_bytes"] * (world.size > 1),
            "allreduce_bytes_per_step": self.exchange.bytes_per_step,
            "allreduce_seconds": self.exchange.seconds_total,
            "rank_state_digests": digests,
            "peak_rss_bytes": rss,  # per rank
            "gpu_memory_used_bytes": gpu_memory_used(self.ctx),
            "seconds_to_first_step": (stats.first_step_at - process_start_time()) if stats.first_step_at else None,
            "freeze_switches": self.switches,
            # as the optimizer holds them: per trainable parameter, lr multiplier
            "lr_mult": {self.names[p]: float(self.trainer._optimizer.param_dict[i].lr_mult)  # noqa: SLF001
                        for i, p in enumerate(self.trainer._params)},  # noqa: SLF001
            "resumed": self.resume_meta is not None,
            "skipped_steps": self.skipped_steps,
            "precision": self.compute_dtype,
            "loss_scale": self.loss_scale.scale, "loss_scale_overflows": self.loss_scale.overflows,
            "feature_cache": ({"hits": self.cache.hits, "misses": self.cache.misses,
                               "file": self.cache.path} if self.cache is not None else None),
            "bad_samples": self.train_loader.bad,
            "forward_only_samples_per_sec_per_rank": self.forward_rate,
            "throughput_vs_forward_only": (rate / world.size / self.forward_rate) if self.forward_rate else None,
            "metrics_port": self.metrics.port,
            "val_history": stats.val_history,
            # per epoch of this run: samples/s over its steps (data wait included; evaluation
            # and checkpoints not); with the feature cache, epochs after the first show its effect
            "epoch_history": stats.epochs,
            "history": self.metrics.history,
        }
        if world.rank == 0:
            path = os.path.join(self.out, "model.params")
            checkpoint.atomic_write(path, lambda tmp: self.net.save_parameters(tmp))
            checkpoint.atomic_write(os.path.join(self.out, "summary.json"),
                                    lambda tmp: _write_json(tmp, summary))
            log(world, f"done: {self.global_step} steps, val top1 {summary['val_top1']}, "
                       f"{rate:.1f} samples/s; wrote {path}")
        self.finished = True
        self.metrics.finish(summary)
        return summary


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gpu_memory_used(ctx):
    """Bytes in use on this rank's GPU now (MXNet keeps its pool, so this is near the peak)."""
    if ctx.device_type != "gpu":
        return None
    free, total = mx.context.gpu_memory_info(ctx.device_id)
    return int(total - free)


def process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)


def run(cfg: Config, world=None) -> dict:
    world = world or dist.init_world(stall_timeout=cfg.train.stall_timeout)
    job = Job(cfg, world)
    try:
        job.setup()
        return job.fit()
    finally:
        job.finished = True
        if getattr(job, "metrics", None) is not None:
            job.metrics.close()
        if getattr(job, "cache", None) is not None:
            job.cache.close()
        for loader in (getattr(job, "train_loader", None), getattr(job, "val_loader", None)):
            if loader is not None:
                loader.close()
