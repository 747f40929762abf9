"""Many heads, one backbone pass (`heads.grid`): K copies of the trainable part, each with its
own optimizer settings, trained on the same batches from one frozen-prefix forward (or one
feature-cache read), their gradients in one fused exchange.

A run without a grid is the one-head case of the same objects: its head is the network's own
trainable part and keeps `train.on_nonfinite`. In a grid, head h0 is the network's own
trainable part as well (its tensors keep their structural names); h1, h2, ... are copies of
it (their tensors are named `heads.h1.<structural name>` in checkpoints), initialised from it
so that every head starts where a single run with the same seed starts.

A head whose loss (on any rank, from its slot in the step's ballot) or averaged gradients are
not finite is stopped alone: agreed data, so every rank stops it at the same step. It keeps
its last finite weights and is marked `diverged`; the others go on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from distft.components.optim import OptimizerState, build_exchange, build_trainer
from distft.components.probe import SOLVER
from distft.components.schedule import LRSchedule
from distft.components.validation import evaluate_many
from distft.console import warn
from distft.distributed import syncbn
from distft.distributed.agreement import agreed
from distft.errors import CheckpointError, NumericalError
from distft.models import freeze
from distft.models.freeze import lr_multipliers, suffix_param_names
from distft.models.gluon import structural_params
from distft.models.network import SplitNet, build, set_weights
from distft.runfolder import RunFolder
from distft.train.grid import describe, grid_points, head_config
from distft.train.memory import check_fits

COPY_PREFIX = "heads."


def loss_function(label_smoothing: float, classes: int):
    """Cross-entropy; with label smoothing, against (1 - e) x one-hot + e / classes."""
    plain = gluon.loss.SoftmaxCrossEntropyLoss()
    if not label_smoothing:
        return plain
    dense = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)

    def smoothed(logits, labels):
        target = mx.nd.one_hot(labels, classes) * (1.0 - label_smoothing) + label_smoothing / classes
        return dense(logits, target)

    return smoothed


# --- the heads ----------------------------------------------------------------------------------

@dataclass
class Head:
    index: int
    name: str
    overrides: dict
    cfg: object  # the job's config with this head's overrides
    suffix: object  # runs the trainable part on the prefix's output
    params: dict  # state name -> Parameter: trainable tensors and moving BN statistics
    trainable: list  # state names of the trainable tensors, in exchange order
    all_params: dict  # structural name -> Parameter, every tensor of the trainable part
    loss_fn: object
    prefix: str = ""  # state name = prefix + structural name
    trainer: object = None
    schedule: object = None
    diverged: Optional[dict] = None
    evals: dict = field(default_factory=dict)
    loss: Optional[float] = None
    # at the end of a head-only run: probe.py's objective and its gradient norm at the weights
    objective: Optional[float] = None
    gradient_norm: Optional[float] = None


class HeadSet:
    """The heads of a run (one without a grid), what the loop and the step call on them."""

    def __init__(self, cfg, world, ctx, heads: list[Head], plan_state: list[str], network_params: dict,
                 exchanges=None):
        self.cfg, self.world, self.ctx, self.heads = cfg, world, ctx, heads
        self.plan_state = plan_state  # the network's own trainable state (head h0's, and any shared)
        self.network_params = network_params  # structural name -> Parameter, the whole network
        self.grid = bool(cfg.heads.grid)
        self.exchange = None
        self.exchanges = exchanges  # the synchronized BNs' (distft.bnexchange), None without them

    def __iter__(self):
        return iter(self.heads)

    def __len__(self) -> int:
        return len(self.heads)

    def __getitem__(self, i: int) -> Head:
        return self.heads[i]

    @property
    def active(self) -> list[Head]:
        return [h for h in self.heads if h.diverged is None]

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.heads]

    # --- state -----------------------------------------------------------------------------------
    def state_names(self) -> list[str]:
        """What every head trains (and its moving statistics): what checkpoints hold."""
        return self.plan_state + self.copies_state_names()

    def copies_state_names(self) -> list[str]:
        return [n for h in self.heads[1:] for n in h.params]

    def copies_params(self) -> dict:
        return {n: p for h in self.heads[1:] for n, p in h.params.items()}

    def trainable_params(self) -> list:
        return [h.params[n] for h in self.heads for n in h.trainable]

    def trainers(self) -> list:
        return [h.trainer for h in self.heads]

    # --- wiring ----------------------------------------------------------------------------------
    def bind(self, world, spec) -> None:
        """Each head's optimizer; one gradient exchange for all of them."""
        cfg = self.cfg
        self.exchange = build_exchange(cfg, world, self.trainable_params(), heads=len(self) if self.grid else 0,
                                       synchronized_bn=self.exchanges is not None)
        for h in self.heads:
            mults = {h.prefix + n: m for n, m in lr_multipliers(spec, h.cfg.optimizer.lr_mult).items()}
            h.trainer = build_trainer(h.cfg, [h.params[n] for n in h.trainable], h.trainable, mults)

    def set_schedules(self, steps_per_epoch: int, total_steps: int, scale: float) -> None:
        for h in self.heads:
            h.schedule = LRSchedule.from_config(h.cfg.optimizer, steps_per_epoch, total_steps, scale)

    def learning_rates(self, step: int) -> list[float]:
        return [h.schedule(step) for h in self.heads]

    def capture_optimizer(self, names: dict, loss_scale) -> OptimizerState:
        return OptimizerState.capture_all(self.trainers(), names, loss_scale)

    def follow(self, other: "HeadSet") -> None:
        """Take `other`'s heads (built for a new freeze plan) in place of these, each keeping its
        learning-rate schedule: the run's heads stay one object for the parts that hold them."""
        for head, before in zip(other.heads, self.heads):
            head.schedule = before.schedule
        self.heads, self.plan_state, self.exchanges = other.heads, other.plan_state, other.exchanges
        self.exchange = None

    # --- a checkpoint's part ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """`arrays`: every head's trainable tensors and moving statistics (the checkpoint's
        weights file, by state name); a grid's metadata: the heads that diverged (a solve
        marks them at its end only, after its last checkpoint's state is final)."""
        params = self._all_params()
        doc = {"arrays": {n: params[n].data().as_in_context(mx.cpu()) for n in self.state_names()}}
        if self.grid and self.cfg.optimizer.name != SOLVER:
            doc["diverged_heads"] = {h.name: h.diverged for h in self.heads if h.diverged}
        return doc

    def load_state_dict(self, state: dict) -> int:
        """`state["arrays"]`: the weights rank 0 read from the checkpoint `state["path"]` ({}
        elsewhere: the start-state check brings them over); the rest: its metadata, on every
        rank. Heads that had diverged stay stopped. Returns the bytes broadcast (none)."""
        agreed(self.world, "restoring the checkpoint", lambda: self._load_weights(state["arrays"], state["path"]))
        for name, info in (state.get("diverged_heads") or {}).items():
            for h in self.heads:
                if h.name == name:
                    h.diverged = info
        return 0

    def _all_params(self) -> dict:
        """State name -> Parameter: the network's and a grid's other heads'."""
        return {**self.network_params, **self.copies_params()}

    def _load_weights(self, arrays: dict, path: str) -> None:
        params = self._all_params()
        want, have = set(self.state_names()), set(arrays)
        unknown = sorted(have - set(params))
        if unknown or not want <= have:
            missing = sorted(want - have)
            raise CheckpointError(
                f"{path}: does not belong to this model/freeze plan"
                + (f"; not in {self.cfg.model.name}: {', '.join(unknown[:3])}" if unknown else "")
                + (f"; missing: {', '.join(missing[:3])}" if missing else ""))
        set_weights(params, arrays, self.ctx, path)

    # --- forward ----------------------------------------------------------------------------------
    def losses(self, heads: list, features, labels, scale: float) -> list:
        """Each of `heads`' (loss, scaled loss), recorded. With synchronized BNs the heads run
        side by side, one exchange per layer carrying all of them (bnexchange.lockstep); the
        caller runs backward after."""
        def run(h):
            def forward():
                with autograd.record():
                    loss = h.loss_fn(h.suffix(features), labels)
                    return loss, (loss * scale if scale != 1.0 else loss)
            return forward

        return self.exchanges.lockstep([run(h) for h in heads])

    @property
    def in_lockstep(self) -> bool:
        return self.exchanges is not None and len(self.active) > 1

    # --- a step's verdict, per head --------------------------------------------------------------
    def judge(self, world, verdict, sums: np.ndarray, step: int, epoch: int) -> list[Head]:
        """Stop every head whose loss (on some rank) or averaged gradients are not finite
        (agreed data: the same on every rank). Returns the heads that update."""
        updating, start = [], 0
        for h in self.heads:
            mine = sums[start:start + len(h.trainable)]
            start += len(h.trainable)
            if h.diverged is not None:
                continue
            loss_bad = h.index in verdict.nonfinite_heads
            grad_bad = not np.isfinite(mine).all()
            if not (loss_bad or grad_bad):
                updating.append(h)
                continue
            reason = "non-finite loss" + (f" on rank(s) {list(verdict.nonfinite_ranks)}" if
                                          verdict.nonfinite_ranks else "") if loss_bad else "non-finite gradients"
            h.diverged = {"step": step, "epoch": epoch, "reason": reason}
            for n in h.trainable:
                h.params[n].zero_grad()
            warn(world, f"step {step} (epoch {epoch}): head {h.name} ({describe(h.overrides)}) diverged "
                        f"({reason}); it is stopped, {len(self.active)} head(s) go on")
        if not self.active:
            raise NumericalError(f"step {step} (epoch {epoch}): every head of heads.grid diverged "
                                 "(lower optimizer.lr in heads.grid)")
        return updating

    def figures(self, losses: list, lrs: list) -> tuple:
        """(loss, lr, per head) for metrics: a run without a grid reports its head's figures
        as before; a grid the mean loss over its active heads, and each head's."""
        for h, loss in zip(self.heads, losses):
            if loss is not None:
                h.loss = loss
        if not self.grid:
            return losses[0], lrs[0], None
        per_head = {h.name: {"loss": loss, "lr": lr} for h, loss, lr in zip(self.heads, losses, lrs)
                    if h.diverged is None and loss is not None}
        mean = float(np.mean([v["loss"] for v in per_head.values()])) if per_head else float("nan")
        return mean, lrs[0], per_head

    # --- validation and selection ----------------------------------------------------------------
    def evaluate(self, world, runner, loader, batch_size: int, ctx, loss_fn, beat) -> list[tuple[Head, dict]]:
        """Every active head on the validation set, from one pass of the frozen prefix."""
        heads = self.active

        def forward(x):
            features = runner.features(x)
            return [h.suffix(features) for h in heads]

        results = evaluate_many(world, forward, len(heads), loader, batch_size, ctx, loss_fn, beat,
                                top5=self.cfg.model.classes > 5)
        for h, evals in zip(heads, results):
            h.evals = evals
        return list(zip(heads, results))

    def best(self) -> Optional[Head]:
        """By heads.select among the heads that did not diverge; ties go to the first."""
        judged = [h for h in self.heads if h.diverged is None and h.evals]
        if not judged:
            return None
        if self.cfg.heads.select == "val_loss":
            return min(judged, key=lambda h: h.evals["val_loss"])
        return max(judged, key=lambda h: h.evals["val_top1"])

    def summary(self) -> list[dict]:
        out = []
        for h in self.heads:
            doc = {"name": h.name, "overrides": h.overrides,
                   **{k: h.evals.get(k) for k in ("val_top1", "val_loss")}, "train_loss": h.loss}
            if h.objective is not None:
                doc.update(objective=h.objective, gradient_norm=h.gradient_norm)
            if h.diverged:
                doc["diverged"] = h.diverged
            out.append(doc)
        return out

    # --- outputs ---------------------------------------------------------------------------------
    def network_arrays(self, net, head: Head) -> dict:
        """The full network's tensors with `head`'s trainable part (what save_parameters writes):
        CPU arrays as they are, others copied to the CPU (a file records each array's device,
        and one that names gpu(0) loads onto a GPU wherever one is)."""
        arrays = {n: p.data() for n, p in structural_params(net).items()}
        arrays.update({n: p.data() for n, p in head.all_params.items()})
        return {n: a if a.context == mx.cpu() else a.copyto(mx.cpu()) for n, a in arrays.items()}

    def model_files(self, run: RunFolder, net) -> dict:
        """{path: write(tmp path)} for model.params (the best head's) and, in a grid, every
        head's heads/<name>/model.params. Written as `save_parameters` writes them, but from the
        arrays themselves: `save_parameters` copies every tensor first (+85 MiB of peak memory for
        resnet50_v2 as training ends)."""
        def writer(head):  # the arrays are gathered (on a GPU, copied) as each file is written
            return lambda tmp: mx.nd.save(tmp, self.network_arrays(net, head))

        if not self.grid:
            return {run.model: writer(self.heads[0])}
        files = {}
        for h in self.heads:
            os.makedirs(os.path.dirname(run.head_model(h.name)), exist_ok=True)
            files[run.head_model(h.name)] = writer(h)
        files[run.model] = writer(self.best() or self.heads[0])
        return files


def build_heads(cfg, world, net, network, ctx) -> HeadSet:
    """Head h0 is the network's own trainable part; the grid's other points get copies of it,
    initialised from it. A grid that would not fit in memory is refused here."""
    plan = network.plan
    points = grid_points(cfg.heads.grid)
    structural = structural_params(net)
    suffix_names = suffix_param_names(plan, list(structural))
    state_names = plan.trainable_state_names()
    trainable = plan.trainable_names()

    def head(i, point, suffix, all_params, prefix):
        head_cfg = head_config(cfg, point.overrides)
        mine = [n for n in state_names if n in all_params]
        return Head(i, point.name, point.overrides, head_cfg, suffix,
                    {prefix + n: all_params[n] for n in mine}, [prefix + n for n in trainable], all_params,
                    loss_function(head_cfg.train.label_smoothing, cfg.model.classes), prefix)

    heads = [head(0, points[0], network.runner.suffix, {n: structural[n] for n in suffix_names}, "")]
    if len(points) > 1:
        check_fits(cfg, world, plan, network.runner, len(points), ctx)
        for i, point in enumerate(points[1:], start=1):
            suffix, all_params = _copy_trainable_part(cfg, net, plan, suffix_names, ctx, network.exchanges)
            heads.append(head(i, point, suffix, all_params, f"{COPY_PREFIX}{point.name}."))
    return HeadSet(cfg, world, ctx, heads, state_names, structural, network.exchanges)


def _copy_trainable_part(cfg, net, plan, suffix_names: list[str], ctx, exchanges=None):
    """Another instance of the trainable part: the same model built again, only its trainable
    part's tensors allocated (the frozen prefix stays unallocated), set to `net`'s values. Its
    BatchNorms are synchronized as the network's are (`exchanges`), under the same layer names:
    each head keeps its own statistics, and one exchange per layer carries every head's."""
    twin = build(cfg.model.name, cfg.model.classes)
    freeze.apply(twin, plan)
    if exchanges is not None:
        syncbn.convert(twin, [p for p, m in plan.bn_modes.items() if m != freeze.BN_FROZEN], exchanges)
    runner = SplitNet(twin, plan.prefix, plan.suffix)
    source, mine = structural_params(net), structural_params(twin)
    for n in suffix_names:
        p = mine[n]
        p.shape = source[n].shape
        p.initialize(init=mx.init.Zero(), ctx=ctx)
        p.set_data(source[n].data())
    if cfg.train.hybridize:
        runner.hybridize(ctx.device_type, keep_imperative=syncbn.is_sync)
    return runner.suffix, {n: mine[n] for n in suffix_names}
