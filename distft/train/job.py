"""The training job: wires the components together; `fit` is the loop.

One step: this rank's share of the global batch -> frozen prefix (no autograd, or the feature
cache) -> trainable suffix under autograd -> backward (micro-batches accumulated) -> gradient
exchange (trainable gradients + the step's ballot) -> update (`step.py`).

Set-up order matters for multi-rank runs: rank 0 alone reads the checkpoint to resume from and
every rank learns its metadata (`checkpointer.py`); every rank loads the pretrained file itself;
every tensor is then verified by hash and only what differs from rank 0 (normally: the state a
resume read) is broadcast from rank 0 (`agreement.py`).
"""
from __future__ import annotations

import time
from typing import Optional

from mxnet import gluon

from distft.models import network
from distft.models.gluon import describe, structural_params
from distft import precision
from distft.components import probe
from distft.distributed.agreement import agree_on_start_state, agreed, agreed_everywhere, check_same_config, from_rank0, sync_point
from distft.train.advice import warnings
from distft.train.builders import Data, DataSets, Network, build_cache, build_data, build_network, open_data
from distft.components.checkpointer import Checkpointer, check_relaunch
from distft.config import Config, dump_config
from distft.console import log, warn
from distft.errors import Preempted
from distft.models.freeze import BN_STATS
from distft.models.spec import ModelSpec
from distft.components.cache import FeatureCache
from distft.distributed.exchange import GradientExchange
from distft.train.grid import grid_points, table as heads_table
from distft.train.heads import HeadSet, build_heads
from distft.components.metrics import Metrics, forward_probe
from distft.components.optim import Optimizers, trainer_lr_mults
from distft.data.preprocess import Preprocess
from distft.train.resilience import Resilience
from distft.data import classes
from distft.files import atomic_write
from distft.launchenv import restart_record
from distft.runfolder import RunFolder
from distft.components.state import Batching, TrainState, split_global_batch
from distft.train.step import TrainingStep
from distft.components.summary import LaunchRecord, Stats, completed, compose, write_outputs


class Job:
    def __init__(self, cfg: Config, world):
        self.cfg, self.world = cfg, world
        self.ctx = world.context()
        self.out = cfg.train.output
        self.run = RunFolder(self.out)
        self.guard = Resilience(world, cfg.train.stall_timeout, cfg.train.preempt_grace)
        self.checkpoints = Checkpointer(cfg, world, self.ctx)
        # built by setup, in this order
        self.sets: Optional[DataSets] = None  # data.train and the validation set, opened
        self.state: Optional[TrainState] = None  # where the job is (from the checkpoint resumed from)
        self.batching: Optional[Batching] = None  # this launch's split of the global batch
        self.data: Optional[Data] = None  # sampler and loaders
        self.metrics: Optional[Metrics] = None
        self.compute_dtype: str = "float32"
        self.loss_scale: Optional[precision.LossScale] = None
        self.net = None  # the Gluon model
        self.spec: Optional[ModelSpec] = None  # the model as plain data
        self.params: dict = {}  # state name -> Parameter: the network's and a grid's other heads'
        self.names: dict = {}  # Parameter -> state name
        self.network: Optional[Network] = None  # the network as the freeze plan in force runs it
        self.heads: Optional[HeadSet] = None
        self.loss_fn = None  # validation's loss
        self.solver: Optional[probe.LinearProbe] = None  # optimizer.name: lbfgs (no training step)
        self.training_step: Optional[TrainingStep] = None  # runs one step; not state.step, the count
        self.exchange: Optional[GradientExchange] = None  # the gradient exchange in force
        self.cache: Optional[FeatureCache] = None
        self.forward_rate: Optional[float] = None  # samples/s of the forward pass alone, per rank
        # this launch's figures
        self.started = 0.0  # when the loop started (perf_counter)
        self.optimum: Optional[dict] = None  # a head-only run's objective at its end (summary.json)
        self.switches: list = []
        self.bytes_broadcast = self.bytes_control = 0

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self) -> Optional[dict]:
        """Build every part. Returns the summary instead when the job is already complete."""
        cfg, world = self.cfg, self.world
        self.check_output()
        self.bytes_control += check_same_config(world, cfg)
        self.sets = open_data(cfg, world, lambda msg: log(world, msg))  # resolves model.classes: auto
        meta = self.checkpoints.find_resume_point()
        if meta:
            check_relaunch(cfg, meta, self.sets.identity)
            if cfg.data.val_split and "data" not in meta:  # written before samples were held out by name
                self.sets = open_data(cfg, world, lambda msg: log(world, msg), holdout_by_position=True)
        solving = cfg.optimizer.name == probe.SOLVER
        samples = len(self.sets.train)  # a solve's step is a pass over all of data.train (full batch)
        self.state = TrainState(global_batch=samples if solving else
                                cfg.data.global_batch or cfg.data.batch_size * world.size)
        if meta:
            self.state.load_state_dict(meta, cfg.data.batch_size)
        self.batching = probe.batching(samples, world, cfg.data.batch_size) if solving else \
            split_global_batch(self.state.global_batch, world.size, cfg.data.batch_size,
                               self.state.world_size if meta else world.size)
        self.data = build_data(cfg, world, self.batching, self.sets)
        solved = solving and probe.finished(meta)
        if meta and (self.state.step >= self.data.total_steps or solved) and \
                from_rank0(world, world.rank == 0 and completed(self.out, self.state.step), "distft.complete"):
            log(world, f"{self.out}: the job is complete (step {self.state.step} of {self.data.total_steps}); "
                       "nothing to do " + ("(the solve had ended)" if solved else
                                           "(raise train.epochs or train.max_steps to train on)"))
            return {"complete": True, "steps": self.state.step}
        self.build(solving, samples)
        self.start_outputs(meta)
        return None

    def build(self, solving: bool, samples: int) -> None:
        """The parts of the job where it is (`state`): metrics, the model and its heads, the
        optimizer (or the solve) and the checkpointer that restores them; then every rank is
        proved to hold rank 0's model."""
        cfg, world = self.cfg, self.world
        self.metrics = Metrics(cfg.metrics, world, self.out, cfg.train.log_every, cfg.train.stall_timeout,
                               heads=[p.name for p in grid_points(cfg.heads.grid)] if cfg.heads.grid else None)
        self.compute_dtype = precision.enable(cfg.train.precision, self.ctx)  # before the model is built
        self.loss_scale = precision.LossScale(self.compute_dtype)
        self.net = agreed_everywhere(world, "building the model",
                                     lambda: network.create(cfg.model, self.ctx, seed=cfg.train.seed))
        self.spec = describe(self.net, cfg.model.name, cfg.model.head)
        self.params = structural_params(self.net)
        self.network = build_network(cfg, world, self.net, self.spec, self.state.plan_epoch, self.ctx)
        if solving:
            probe.check_plan(cfg, self.network.plan, self.net)  # the same verdict on every rank
        self.heads = agreed_everywhere(world, "building the heads", lambda: build_heads(
            cfg, world, self.net, self.network, self.ctx))
        self.params.update(self.heads.copies_params())  # a grid's other heads, by their state names
        self.names = {p: n for n, p in self.params.items()}
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()  # validation: plain cross-entropy for every head
        if solving:
            self.solver = probe.LinearProbe(cfg, world, self.heads, samples, self.ctx)
            self.cache = self.solver.cache
        else:
            self.training_step = TrainingStep(cfg, world, self.ctx, self.loss_fn, self.loss_scale, self.metrics,
                                              self.names)
            self.bind_network()
            self.heads.set_schedules(self.data.steps_per_epoch, self.data.total_steps,
                                     self.state.global_batch / cfg.data.batch_size)
        optimizer = self.solver if solving else Optimizers(world, self.heads.trainers, self.names, self.loss_scale)
        self.checkpoints.track(self.state, self.heads, optimizer, data=self.sets.identity,
                               steps_per_epoch=self.data.steps_per_epoch, total_steps=self.data.total_steps,
                               prepare=self.prepare_checkpoint, together=self.guard.together, events=self.metrics)
        self.bytes_broadcast += self.checkpoints.load()  # rank 0 read the files: the rest is verified below
        exchanged, sent = agree_on_start_state(world, self.network.plan, self.params, cfg.dist.on_frozen_mismatch,
                                               cfg.dist.trainable_start, self.heads.copies_state_names())
        self.bytes_control += exchanged + self.checkpoints.bytes_control
        self.bytes_broadcast += sent

    def check_output(self) -> None:
        agreed(self.world, "checking train.output", self.run.check_writable)

    def bind_network(self) -> None:
        """The optimizers, gradient exchange, cache and step for the network as set up now."""
        plan, waited = self.network.plan, self.exchange.seconds_total if self.exchange is not None else 0.0
        self.heads.bind(self.world, self.spec)
        self.exchange = self.heads.exchange
        self.exchange.seconds_total = waited  # a run's total, across plan switches
        if self.cache is not None:
            self.cache.close()
        self.cache = build_cache(self.cfg, self.network, self.data.sampler, self.world.rank)
        self.training_step.bind(self.network.runner, self.heads, plan, self.cache, self.batching)

    def start_outputs(self, meta) -> None:
        cfg, world, b = self.cfg, self.world, self.batching
        agreed_everywhere(world, "serving metrics", self.metrics.start)  # a port taken on one machine

        def write():  # every check has passed: now the run folder may change
            atomic_write(self.run.config, lambda tmp: dump_config(cfg, tmp))
            classes.save(self.out, self.sets.class_names, cfg.model.classes)
            Preprocess.from_config(cfg).save(self.run.preprocess)

        agreed(world, "writing config.yaml", write)
        for advice in warnings(cfg, self.network.plan, self.data.steps_per_epoch, len(self.sets.train)):
            warn(world, advice)
        self.metrics.event("start", step=self.state.step, world_size=world.size, global_batch=b.global_batch)
        self.forward_rate = forward_probe(self.network.runner, self.ctx, b.micro, cfg.model.image_size,
                                          cfg.metrics.probe_batches)
        t = self.network.plan.totals()
        self.metrics.startup(t, self.bytes_broadcast + self.bytes_control, self.forward_rate)
        steps = (f"lbfgs on all {b.global_batch} samples, about {b.per_rank} per rank (features in batches of "
                 f"{b.micro}), at most {self.data.total_steps} passes" if self.solver else
                 f"global batch {b.global_batch} ({b.accumulate} x {b.micro} per rank), "
                 f"{self.data.steps_per_epoch} steps/epoch")
        log(world, f"{cfg.model.name}: {t['trainable_params']:,} trainable / {t['frozen_params']:,} frozen params; "
                   f"frozen prefix {len(self.network.plan.prefix)} stages; {world.size} rank(s) [{world.backend}"
                   f"{'' if not self.network.synchronized_bn else ', BN statistics over ' + self.network.bn_channel}], "
                   + steps)
        if meta:
            log(world, f"resumed at step {self.state.step} (epoch {self.state.epoch}), written on "
                       f"{self.state.world_size} rank(s)")
        self.metrics.restarted(restart_record(), at_step=self.state.step)  # relaunched by launch.sh --max-restarts

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, state, data, stats = self.cfg, self.state, self.data, Stats()
        self.guard.start()
        self.started, evals = time.perf_counter(), {}
        while state.step < data.total_steps and state.epoch < cfg.train.epochs:
            if any(self.network.plan_epoch < s["epoch"] <= state.epoch for s in cfg.freeze.schedule):
                self.switch_plan(state.epoch)
            for _, idx, x, y in self.batches(stats):
                lrs = self.heads.learning_rates(state.step)  # one per head (one without a grid)
                stats.begin_step()
                losses = self.training_step(idx, x, y, lrs, self.guard.stop_requested, state.step + 1, state.epoch)
                state.advance()
                stats.end_step(self.batching.global_batch)
                self.record_step(stats, losses, lrs)
                self.guard.poll(state.step)
                if self.training_step.agreed_stop():
                    self.stop()
                self.checkpoints.save()  # when due
                self.guard.beat()
                stats.mark()
            stats.end_epoch(state.epoch, self.batching.global_batch)
            epoch_done = state.step_in_epoch == data.steps_per_epoch
            if epoch_done and data.val_loader is not None:
                evals = self.validate(state.epoch)
            self.checkpoints.save(boundary=True)  # when due
            if epoch_done:
                state.start_epoch(state.epoch + 1)
        if not evals and data.val_loader is not None:  # resumed a finished run: still report
            evals = self.validate(state.epoch)
        return self.finish(stats, evals)

    def batches(self, stats: Stats):
        """The rest of the current epoch: (step, indices, images, labels) of this rank's share."""
        state, sampler = self.state, self.data.sampler
        first = state.step_in_epoch
        last = min(sampler.steps_per_epoch, first + self.data.total_steps - state.step)
        perm = sampler.permutation(state.epoch)
        plan = [(s, sampler.indices(state.epoch, s, perm)) for s in range(first, last)]
        skip = self.cache.has_all if self.cache is not None else None
        stats.start_epoch()
        return self.data.train_loader.iterate(plan, state.epoch, skip=skip)

    def record_step(self, stats: Stats, losses: list, lrs: list) -> None:
        state = self.state
        loss, lr, per_head = self.heads.figures(losses, lrs)
        self.metrics.step(samples=self.batching.per_rank, seconds=stats.last_step, data=stats.last_wait,
                          allreduce=self.exchange.seconds_total - stats.exchange_seconds,
                          allreduce_bytes=self.exchange.bytes_per_step, loss=loss, lr=lr, epoch=state.epoch,
                          heads=per_head)
        stats.exchange_seconds = self.exchange.seconds_total
        loader = self.data.train_loader
        self.metrics.bad(loader.bad - stats.bad_reported)
        stats.bad_reported = loader.bad
        epoch_end = state.step_in_epoch == self.data.steps_per_epoch or state.step == self.data.total_steps
        if state.step % self.cfg.train.log_every == 0 or epoch_end:
            record = self.metrics.window(global_step=state.step, total_steps=self.data.total_steps,
                                         epoch=state.epoch, loss=loss, lr=lr, heads=per_head)
            if not self.metrics.shows_progress:
                what = f"loss {loss:.4f} lr {lr:.4g}" if per_head is None else \
                    f"loss {loss:.4f} (mean of {len(per_head)} heads)"
                log(self.world, f"epoch {state.epoch} step {state.step_in_epoch}/{self.data.steps_per_epoch} "
                                f"{what} samples/s {record['samples_per_sec']:.1f}")

    # --- what the loop calls --------------------------------------------------------------------
    def sync(self, where: str, names=None) -> list[str]:
        local = self.network.local_stats(self.cfg.dist.batchnorm)
        if local:  # a grid's other heads have moving statistics of their own
            local = local + [n for n in self.heads.copies_state_names() if n.rpartition(".")[2] in BN_STATS]
        settle = self.training_step.settle if self.training_step is not None else (lambda: None)
        return sync_point(self.world, settle, self.params, local, where, names)

    def validate(self, epoch: int) -> dict:
        """Every rank evaluates the same model (the sync point first), each on its shard; a
        grid, every head from one pass of the frozen prefix. Returns the best head's figures."""
        with self.guard.together():
            self.sync(f"validation at step {self.state.step}", self.heads.state_names())
            results = self.heads.evaluate(self.world, self.network.runner, self.data.val_loader,
                                          self.cfg.data.val_batch_size or self.batching.micro, self.ctx,
                                          self.loss_fn, self.guard.beat)
        for head, evals in results:
            name = f" head {head.name}" if self.heads.grid else ""
            top5 = "n/a" if evals["val_top5"] is None else f"{evals['val_top5']:.4f}"  # n/a: 5 classes or fewer
            log(self.world, f"epoch {epoch}{name} val top1 {evals['val_top1']:.4f} top5 {top5} "
                            f"loss {evals['val_loss']:.4f}")
            self.metrics.evaluation(evals, epoch, self.state.step, head=head.name if self.heads.grid else None)
        return self.heads.best().evals

    def prepare_checkpoint(self, at: TrainState) -> str:
        """Before rank 0 writes `at`: every rank holds the same model, proved by digest (returns
        rank 0's), and its weights are finite."""
        if self.solver is not None:
            self.solver.write_weights()
        digests = self.sync(f"checkpoint at step {at.step}")
        at.plan_epoch = self.network.plan_epoch
        if self.solver is None:
            self.training_step.check_weights(at.step, self.state.epoch)
        return digests[0]

    def stop(self) -> None:
        """Every rank agreed to stop (preemption): checkpoint at this step and leave with 75."""
        self.guard.stop_agreed()
        if self.state.step_in_epoch == self.data.steps_per_epoch and self.data.val_loader is not None:
            self.validate(self.state.epoch)  # the relaunch starts the next epoch: validate this one now
        self.checkpoints.save(force=True)
        self.guard.finished = True
        raise Preempted(f"preempted ({self.guard.stop_reason}) at step {self.state.step}; checkpoint written; "
                        "run the same command again to resume")

    def switch_plan(self, epoch: int) -> None:
        """Gradual unfreezing at an epoch boundary, at the same step on every rank: the network
        follows the new plan; the optimizer takes the new parameters with fresh state and keeps
        the state of the others. Nothing is broadcast: newly trainable tensors were frozen,
        hence verified identical."""
        digests = self.sync(f"freeze-plan switch at epoch {epoch}")
        old = set(self.network.plan.trainable_names())
        kept = self.heads.capture_optimizer(self.names, None)
        self.network = build_network(self.cfg, self.world, self.net, self.spec, epoch, self.ctx)
        self.heads.follow(build_heads(self.cfg, self.world, self.net, self.network, self.ctx))  # no grid
        self.bind_network()
        new = set(self.network.plan.trainable_names())
        kept.restore(self.heads[0].trainer, self.names, only={self.params[n] for n in new & old})
        self.switches.append({"epoch": epoch, "step": self.state.step, "trainable_tensors": len(new),
                              "unfrozen": sorted(new - old), "refrozen": sorted(old - new),
                              "rank_state_digests": digests})
        log(self.world, f"epoch {epoch}: freeze plan now trains {len(new)} tensors "
                        f"(+{len(new - old)} / -{len(old - new)})")

    def measure_optimum(self) -> None:
        """A head-only run's objective (probe.py) and its gradient norm at the end: a solve's
        own figures; an SGD run with the feature cache makes one pass over the features
        (its cache, and the samples no rank's shard holds) to show how far from the optimum
        it stopped."""
        cfg, world = self.cfg, self.world
        if self.solver is not None:
            figures = self.solver.figures()
        elif self.cache is not None and probe.plan_problem(cfg, self.network.plan, self.net) is None:
            sampler, runner, batch = self.data.sampler, self.network.runner, self.batching.micro
            loader = self.data.train_loader
            rest = sampler.unassigned()[world.rank::world.size]
            parts = [probe.features(runner, loader, self.ctx, probe.in_batches(sampler.shard(), batch), self.cache,
                                    self.guard.beat, count=False),  # training's hits and misses stay as they were
                     probe.features(runner, loader, self.ctx, probe.in_batches(rest, batch), None, self.guard.beat)]
            chunks = ((x, y) for part in parts for _, x, y in part)
            figures = probe.measure(cfg, world, self.heads, len(self.sets.train), chunks)
        else:
            return
        for h, fig in zip(self.heads, figures):
            h.objective, h.gradient_norm = fig["objective"], fig["gradient_norm"]
        best = self.heads.best() or self.heads[0]
        self.optimum = {"objective": best.objective, "gradient_norm": best.gradient_norm}
        if self.solver is not None:
            self.optimum.update(passes=self.state.step, solver=self.solver.summary())

    def finish(self, stats: Stats, evals: dict) -> dict:
        with self.guard.together():
            digests = self.sync("end of training")
            self.measure_optimum()
            self.metrics.event("end", step=self.state.step)
            summary = compose(self.world, self.record(), stats, evals, digests, self.out)
            agreed(self.world, "writing model.params and summary.json",
                   lambda: write_outputs(self.out, self.heads.model_files(self.run, self.net), summary))
        if self.heads.grid:
            log(self.world, f"heads (heads.select: {self.cfg.heads.select}):\n"
                            + heads_table(summary["heads"], summary["best_head"]))
        top1 = "n/a" if summary["val_top1"] is None else f"{summary['val_top1']:.4f}"
        log(self.world, f"done: {self.state.step} steps, val top1 {top1}, "
                        f"{summary['samples_per_sec']:.1f} samples/s; wrote {self.run.model}")
        self.guard.finished = True
        self.metrics.finish(summary)
        return summary

    def record(self) -> LaunchRecord:
        """This launch, as summary.json reports it."""
        exchange = self.solver if self.solver is not None else self.exchange  # a solve's allreduce: one per pass
        trainer, step, cache, network = self.heads[0].trainer, self.training_step, self.cache, self.network
        grid = {"heads": self.heads.summary(), "best_head": getattr(self.heads.best(), "name", None),
                "heads_select": self.cfg.heads.select} if self.heads.grid else None
        return LaunchRecord(
            model=self.cfg.model.name, classes=self.sets.class_names or [str(i) for i in range(self.cfg.model.classes)],
            data=self.sets.inventory, state=self.state, steps_per_epoch=self.data.steps_per_epoch,
            batching=self.batching, started=self.started, plan_totals=network.plan.totals(),
            frozen_prefix=network.plan.prefix, bytes_broadcast=self.bytes_broadcast, bytes_control=self.bytes_control,
            allreduce_bytes_per_step=exchange.bytes_per_step, allreduce_seconds=exchange.seconds_total,
            gradient_buckets=exchange.allreduces_per_step if self.solver is None else None,
            synchronized_bn_layers=network.synchronized_bn, bn_channel=network.bn_channel,
            bn_exchanges=dict(network.exchanges.counts) if network.exchanges is not None else {},
            exchange_overlapped=step is not None and step.deferred,
            skipped_steps=step.skipped if step is not None else 0, freeze_switches=self.switches,
            lr_mult=trainer_lr_mults(trainer, self.names) if trainer is not None else {},
            precision=self.compute_dtype, loss_scale=self.loss_scale.scale,
            loss_scale_overflows=self.loss_scale.overflows,
            feature_cache=None if cache is None else {"hits": cache.hits, "misses": cache.misses, "file": cache.path},
            bad_samples=self.data.train_loader.bad, forward_rate=self.forward_rate, metrics_port=self.metrics.port,
            ctx=self.ctx, optimum=self.optimum, grid=grid)

    def close(self) -> None:
        self.guard.finished = True
        for part in (self.metrics, self.cache, self.data):
            if part is not None:
                part.close()
