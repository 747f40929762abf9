"""Which parameters train, how each BatchNorm behaves, and what part of the network is a frozen
prefix. `resolve` is plain Python over a ModelSpec; `apply` is the only MXNet call site.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from distft.errors import ConfigError
from distft.models.gluon import find_block, set_use_global_stats, structural_params
from distft.models.spec import ModelSpec, ParamSpec

# BatchNorm modes
BN_FROZEN = "frozen"  # pretrained running statistics, never updated (use_global_stats)
BN_BATCH = "batch"  # frozen affine, batch statistics, running statistics re-estimated
BN_TRAIN = "train"  # inside a trainable block: ordinary training (sync/local across ranks)
BN_STATS = ("running_mean", "running_var")  # Gluon's names for a BatchNorm's statistics


@dataclass
class ParamPlan:
    spec: ParamSpec
    trainable: bool
    bn_mode: Optional[str] = None  # set for the parameters of a BatchNorm layer

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def grad_req(self) -> str:
        return "write" if self.trainable else "null"


@dataclass
class FreezePlan:
    model: str
    params: list[ParamPlan]
    bn_modes: dict[str, str]  # BatchNorm block path -> mode
    prefix: list[str]  # stages run as the frozen prefix (outside autograd)
    suffix: Optional[list[str]]  # stages run under autograd (None: the whole net)
    # MXNet updates a BN's running statistics (CPU) in its backward pass, and backward skips a
    # BN with no trainable parameter when nothing upstream needs a gradient. If such a BN sits
    # upstream of every trainable weight, the suffix input asks for a gradient so backward
    # reaches it. A synchronized BN needs none: it folds its statistics in forward, and its
    # backward writes gamma/beta gradients whatever its input needs (so the first trainable one
    # after the frozen prefix makes no backward exchange).
    input_grad: bool = False
    entries: list[str] = field(default_factory=list)

    # --- derived views ---
    def trainable_names(self) -> list[str]:
        return [p.name for p in self.params if p.trainable]

    def frozen_names(self) -> list[str]:
        return [p.name for p in self.params if not p.trainable and not self.is_moving_state(p)]

    def is_moving_state(self, p: ParamPlan) -> bool:
        """Running statistics of a BatchNorm whose statistics change during training."""
        return p.bn_mode in (BN_TRAIN, BN_BATCH) and p.name.rpartition(".")[2] in BN_STATS

    def moving_state_names(self) -> list[str]:
        return [p.name for p in self.params if self.is_moving_state(p)]

    def trainable_state_names(self) -> list[str]:
        """Trainable weights and changing BN statistics: what rank 0 sends at start (all of them
        with dist.trainable_start: broadcast, those that differ from its own with verify)."""
        return self.trainable_names() + self.moving_state_names()

    def totals(self) -> dict:
        t = [p.spec for p in self.params if p.trainable]
        f = [p.spec for p in self.params if not p.trainable]
        moving = [p.spec for p in self.params if self.is_moving_state(p)]
        return {
            "trainable_params": sum(s.size for s in t),
            "frozen_params": sum(s.size for s in f),
            "trainable_bytes": sum(s.nbytes for s in t),
            "frozen_bytes": sum(s.nbytes for s in f),
            "moving_state_bytes": sum(s.nbytes for s in moving),
            "total_bytes": sum(p.spec.nbytes for p in self.params),
        }


def is_under(name: str, path: str) -> bool:
    """Whether parameter or block `name` is `path` or inside it."""
    return name == path or name.startswith(path + ".")


def _select(spec: ModelSpec, entries: Iterable[str], where: str) -> set[str]:
    """Parameter names selected by block paths and /regex/ entries."""
    selected: set[str] = set()
    for i, entry in enumerate(entries):
        selected |= _select_one(spec, entry, f"{where}[{i}]")
    return selected


def _select_one(spec: ModelSpec, entry: str, label: str) -> set[str]:
    names = [p.name for p in spec.params]
    if entry.startswith("/") and entry.endswith("/") and len(entry) >= 2:
        try:
            pattern = re.compile(entry[1:-1])
        except re.error as exc:
            raise ConfigError(f"{label}: bad regex {entry!r}: {exc}") from None
        hits = {n for n in names if pattern.search(n)}
        if not hits:
            raise ConfigError(f"{label}: {entry} matches no parameter of {spec.name} "
                              f"(names look like {names[0]}, {names[-1]})")
        return hits
    paths = spec.block_paths()
    if entry not in set(paths):
        hint = ""
        if entry in set(names):
            hint = f"; that is a parameter, select it with /^{re.escape(entry)}$/"
        close = difflib.get_close_matches(entry, paths, n=5, cutoff=0.5) or [p for p in paths if "." not in p]
        raise ConfigError(f"{label}: no block named {entry!r} in {spec.name} "
                          f"(nearest: {', '.join(close)}){hint}")
    return {n for n in names if is_under(n, entry)}


def lr_multipliers(spec: ModelSpec, lr_mult: dict) -> dict[str, float]:
    """{parameter name: multiplier} from {block path or /regex/: multiplier}; entries apply in
    order, so a later (more specific) entry overrides an earlier one."""
    out: dict[str, float] = {}
    for key, mult in lr_mult.items():
        for name in _select_one(spec, key, f"optimizer.lr_mult[{key!r}]"):
            out[name] = float(mult)
    return out


def selected_at(spec: ModelSpec, trainable: list[str], schedule: list[dict], epoch: int) -> set[str]:
    """The selection in force at `epoch`: the initial list, then each schedule stage up to it."""
    selected = _select(spec, trainable, "freeze.trainable")
    for i, stage in enumerate(schedule):
        if stage["epoch"] > epoch:
            break
        selected |= _select(spec, stage.get("unfreeze", []), f"freeze.schedule[{i}].unfreeze")
        selected -= _select(spec, stage.get("freeze", []), f"freeze.schedule[{i}].freeze")
    return selected


def resolve(spec: ModelSpec, trainable: list[str], batchnorm: str = BN_FROZEN,
            schedule: Optional[list[dict]] = None, epoch: int = 0,
            synchronized_bn: bool = False) -> FreezePlan:
    """`synchronized_bn`: moving BNs will be synchronized across ranks (distft.syncbn)."""
    selected = selected_at(spec, trainable, schedule or [], epoch)
    bn_paths = {b.path for b in spec.blocks if b.is_batchnorm}
    bn_modes = {}
    for path in sorted(bn_paths):
        own = [p for p in spec.params if p.block == path]
        if any(p.name in selected for p in own):
            bn_modes[path] = BN_TRAIN
        else:
            bn_modes[path] = BN_FROZEN if batchnorm == BN_FROZEN else BN_BATCH
    plans = []
    for p in spec.params:
        trainable_p = p.name in selected and p.differentiable and p.grad_req != "null"
        plans.append(ParamPlan(spec=p, trainable=trainable_p, bn_mode=bn_modes.get(p.block)))

    prefix: list[str] = []
    suffix: Optional[list[str]] = None
    if spec.stages is not None:
        def stage_is_frozen(stage: str) -> bool:
            if any(is_under(n, stage) for n in selected):
                return False
            # a BN re-estimating statistics needs training mode: keep it in the suffix
            return not any(is_under(b, stage) and mode != BN_FROZEN for b, mode in bn_modes.items())

        for stage in spec.stages:
            if not stage_is_frozen(stage):
                break
            prefix.append(stage)
        suffix = spec.stages[len(prefix):]
    trainable_names = {p.spec.name for p in plans if p.trainable}
    stages = suffix if suffix is not None else [""]
    input_grad = False
    for stage in stages:
        for bn, mode in bn_modes.items():
            # a synchronized BN folds its statistics in forward: it needs no backward for them
            needs_backward = not synchronized_bn and not any(p.spec.block == bn and p.trainable for p in plans)
            if mode != BN_FROZEN and (not stage or is_under(bn, stage)) and needs_backward:
                input_grad = True
        if not stage or any(is_under(n, stage) for n in trainable_names):
            break  # downstream of a trainable weight, backward runs anyway
    return FreezePlan(model=spec.name, params=plans, bn_modes=bn_modes, prefix=prefix,
                      suffix=suffix, entries=list(trainable), input_grad=input_grad)


def plan_at(cfg, spec: ModelSpec, epoch: int, synchronized_bn: bool = False) -> FreezePlan:
    """The plan a job's config (freeze.trainable, freeze.batchnorm, freeze.schedule) puts in
    force at `epoch`."""
    return resolve(spec, cfg.freeze.trainable, cfg.freeze.batchnorm, cfg.freeze.schedule, epoch,
                   synchronized_bn=synchronized_bn)


# --- the MXNet side --------------------------------------------------------------------------


def apply(net, plan: FreezePlan) -> None:
    """Set grad_req on every parameter and use_global_stats on every BatchNorm.

    grad_req='null' alone does not freeze a BatchNorm in MXNet 1.x: backward through it still
    moves its running statistics and training mode normalises with batch statistics. A frozen
    BN therefore gets use_global_stats=True. Call before hybridizing (the flag is baked into
    the cached graph); SplitNet.hybridize rebuilds it.
    """
    params = structural_params(net)
    for p in plan.params:
        params[p.name].grad_req = p.grad_req
    for path, mode in plan.bn_modes.items():
        set_use_global_stats(find_block(net, path), mode == BN_FROZEN)


def suffix_param_names(plan: FreezePlan, names: list[str]) -> list[str]:
    """The parameters the trainable part runs (all of them when it is the whole network)."""
    if plan.suffix is None:
        return list(names)
    return [n for n in names if any(n == s or n.startswith(s + ".") for s in plan.suffix)]


# --- reporting ---------------------------------------------------------------------------------


def rows(plan: FreezePlan, spec: ModelSpec, depth: int = 2) -> list[dict]:
    """One row per block at most `depth` levels deep, aggregating the parameters below it."""
    out = []
    for block in spec.blocks:
        if block.path.count(".") >= depth:
            continue
        below = [p for p in plan.params if is_under(p.spec.block, block.path)]
        if not below:
            continue
        bns = sorted({m for b, m in plan.bn_modes.items() if is_under(b, block.path)})
        n_train = sum(p.trainable for p in below)
        n_weights = sum(1 for p in below if p.spec.differentiable and p.spec.grad_req != "null")
        trainable = "yes" if n_train and n_train == n_weights else ("partial" if n_train else "no")
        out.append({
            "block": block.path, "type": block.type, "params": sum(p.spec.size for p in below),
            "trainable": trainable, "bn": "/".join(bns) if bns else "-",
            "bytes": sum(p.spec.nbytes for p in below),
        })
    return out


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def to_json(plan: FreezePlan, spec: ModelSpec, depth: int = 2, schedule_plans=None) -> dict:
    doc = {"model": plan.model, **plan.totals(),
           "frozen_prefix": plan.prefix, "trainable_suffix": plan.suffix, "input_grad": plan.input_grad,
           "bn_modes": plan.bn_modes,
           "blocks": rows(plan, spec, depth),
           "params": [{"name": p.name, "shape": list(p.spec.shape), "dtype": p.spec.dtype,
                       "grad_req": p.grad_req, "bytes": p.spec.nbytes,
                       **({"bn_mode": p.bn_mode} if p.bn_mode else {})} for p in plan.params]}
    if schedule_plans:
        doc["schedule"] = [{"epoch": e, "trainable_params": pl.totals()["trainable_params"],
                            "trainable_bytes": pl.totals()["trainable_bytes"],
                            "frozen_prefix": pl.prefix,
                            "newly_trainable": sorted(set(pl.trainable_names()) - set(prev.trainable_names())),
                            "newly_frozen": sorted(set(prev.trainable_names()) - set(pl.trainable_names()))}
                           for e, pl, prev in schedule_plans]
    return doc


def to_table(plan: FreezePlan, spec: ModelSpec, depth: int = 2, schedule_plans=None) -> str:
    table = rows(plan, spec, depth)
    header = ("block", "type", "params", "trainable", "BN", "bytes")
    lines = [[r["block"], r["type"], f"{r['params']:,}", r["trainable"], r["bn"], _human(r["bytes"])]
             for r in table]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
              for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i in (2, 5) else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    t = plan.totals()
    out.append("")
    out.append(f"trainable: {t['trainable_params']:,} params, {_human(t['trainable_bytes'])}   "
               f"frozen: {t['frozen_params']:,} params, {_human(t['frozen_bytes'])}")
    out.append(f"frozen prefix (no autograd): {', '.join(plan.prefix) or '-'}")
    modes = {}
    for m in plan.bn_modes.values():
        modes[m] = modes.get(m, 0) + 1
    out.append("BatchNorm layers: " + (", ".join(f"{n} {m}" for m, n in sorted(modes.items())) or "none"))
    for e, pl, prev in schedule_plans or []:
        new = len(set(pl.trainable_names()) - set(prev.trainable_names()))
        gone = len(set(prev.trainable_names()) - set(pl.trainable_names()))
        out.append(f"epoch {e}: +{new} / -{gone} trainable tensors -> "
                   f"{pl.totals()['trainable_params']:,} trainable params")
    return "\n".join(out)
