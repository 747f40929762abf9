"""Cross-field checks of a job's config: what no single key's type can express."""
from __future__ import annotations

import dataclasses
import re
import typing

from distft.config.convert import convert, part, suggest
from distft.config.schema import GRID_KEYS, Config
from distft.errors import ConfigError


def check(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    if isinstance(cfg.optimizer.history, str) and cfg.optimizer.history != "auto":
        raise ConfigError(f"optimizer.history: expected an integer or auto, got {cfg.optimizer.history!r}")
    if isinstance(cfg.dist.bucket_bytes, str) and cfg.dist.bucket_bytes != "auto":
        raise ConfigError(f"dist.bucket_bytes: expected an integer or auto, got {cfg.dist.bucket_bytes!r}")
    if isinstance(cfg.model.classes, str) and cfg.model.classes != "auto":
        raise ConfigError(f"model.classes: expected an integer or auto, got {cfg.model.classes!r}")
    if not cfg.freeze.trainable:
        raise ConfigError("freeze.trainable: empty, so nothing would train; name at least one block "
                          "(e.g. [output]) or /.*/ for everything")
    if cfg.data.val_split >= 1.0:
        raise ConfigError(f"data.val_split: a fraction of data.train below 1, got {cfg.data.val_split!r}")
    if cfg.data.val_split and cfg.data.val:
        raise ConfigError("data.val_split: set either data.val or data.val_split, not both")
    for i, entry in enumerate(cfg.freeze.trainable):
        if entry.startswith("/"):
            if len(entry) < 2 or not entry.endswith("/"):
                raise ConfigError(f"freeze.trainable[{i}]: a regex is written /pattern/, got {entry!r}")
            try:
                re.compile(entry[1:-1])
            except re.error as exc:
                raise ConfigError(f"freeze.trainable[{i}]: bad regex {entry!r}: {exc}") from None
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("data.mean/data.std: need three values (R, G, B)")
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"data.std: every value must be > 0, got {cfg.data.std}")
    if sorted(cfg.optimizer.step_epochs) != cfg.optimizer.step_epochs:
        raise ConfigError(f"optimizer.step_epochs: must be increasing, got {cfg.optimizer.step_epochs}")
    if cfg.optimizer.schedule == "step" and not cfg.optimizer.step_epochs:
        raise ConfigError("optimizer.step_epochs: the `step` schedule needs at least one epoch")
    if cfg.train.cache_features and cfg.data.augment:
        raise ConfigError("train.cache_features: needs data.augment: false (augmented views differ every epoch)")
    if cfg.train.cache_features and cfg.data.shards == "reshuffled":
        raise ConfigError("data.shards: `reshuffled` hands every rank new samples each epoch, so "
                          "train.cache_features would rarely hit; use `fixed` or `auto`")
    if not cfg.train.output:
        raise ConfigError("train.output: must name a directory")
    if isinstance(cfg.model.pretrained, str) and not cfg.model.pretrained:
        raise ConfigError("model.pretrained: empty path (use false for no pretrained weights)")
    for i, stage in enumerate(cfg.freeze.schedule):
        where = f"freeze.schedule[{i}]"
        unknown = set(stage) - {"epoch", "unfreeze", "freeze"}
        if unknown:
            key = sorted(unknown, key=str)[0]
            raise ConfigError(f"{where}.{part(key)}: unknown key{suggest(str(key), ['epoch', 'unfreeze', 'freeze'])}")
        epoch = stage.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ConfigError(f"{where}.epoch: expected an integer >= 0, got {epoch!r}")
        if epoch >= cfg.train.epochs:
            raise ConfigError(f"{where}.epoch: {epoch}, but train.epochs is {cfg.train.epochs} (epochs 0 to "
                              f"{cfg.train.epochs - 1}), so this stage would never start (to stop a launch "
                              "before it, set train.max_steps)")
        for key in ("unfreeze", "freeze"):
            paths = stage.get(key, [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ConfigError(f"{where}.{key}: expected a list of block paths, got {paths!r}")
        if not stage.get("unfreeze") and not stage.get("freeze"):
            raise ConfigError(f"{where}: needs `unfreeze` or `freeze`")
    epochs = [s["epoch"] for s in cfg.freeze.schedule]
    if epochs != sorted(epochs):
        raise ConfigError(f"freeze.schedule: epochs must be in order, got {epochs}")
    if cfg.train.label_smoothing >= 1.0:
        raise ConfigError(f"train.label_smoothing: a fraction below 1, got {cfg.train.label_smoothing!r}")
    _check_grid(cfg)
    if cfg.optimizer.name == "lbfgs":
        _check_solver(cfg)


# the keys a grid of heads solved together (optimizer.name: lbfgs) may vary: its objective's
SOLVER_GRID_KEYS = ("optimizer.weight_decay", "train.label_smoothing")


def _check_solver(cfg: Config) -> None:
    """optimizer.name: lbfgs, what the config alone tells (the freeze plan is checked once the
    model is built: probe.check_plan)."""
    if cfg.data.augment:
        raise ConfigError("optimizer.name: lbfgs solves the head on fixed features, and data.augment: true "
                          "changes them every epoch (set data.augment: false, or use sgd)")
    if cfg.freeze.schedule:
        raise ConfigError("optimizer.name: lbfgs trains the head alone, and freeze.schedule unfreezes blocks "
                          "(remove it, or use sgd)")
    for key in cfg.heads.grid:
        if key not in SOLVER_GRID_KEYS:
            raise ConfigError(f"heads.grid.{key}: optimizer.name: lbfgs has no {key.split('.')[1]}; its heads "
                              f"may vary {' and '.join(SOLVER_GRID_KEYS)}")


def _check_grid(cfg: Config) -> None:
    """heads.grid: known keys, each a non-empty list of values its key accepts."""
    grid = cfg.heads.grid
    hints = typing.get_type_hints(Config)
    for key, values in grid.items():
        path = f"heads.grid.{key}" if re.fullmatch(r"[A-Za-z0-9_.\-]+", str(key)) else f"heads.grid.{key!r}"
        if key not in GRID_KEYS:
            raise ConfigError(f"{path}: not a key a head can vary (those are {', '.join(GRID_KEYS)})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: expected a non-empty list of values, got {values!r}")
        section, name = key.split(".")
        owner = hints[section]
        tp = typing.get_type_hints(owner)[name]
        meta = next(f.metadata for f in dataclasses.fields(owner) if f.name == name)
        for i, value in enumerate(values):
            converted = convert(value, tp, f"{path}[{i}]")
            if "min" in meta and converted < meta["min"]:
                raise ConfigError(f"{path}[{i}]: must be >= {meta['min']}, got {converted!r}")
            if key == "train.label_smoothing" and converted >= 1.0:
                raise ConfigError(f"{path}[{i}]: a fraction below 1, got {converted!r}")
    if not grid:
        return
    if not (cfg.data.val or cfg.data.val_split):
        raise ConfigError("heads.select: a grid keeps the head that validates best; set data.val or "
                          "data.val_split")
    if cfg.freeze.schedule:
        raise ConfigError("heads.grid: not with freeze.schedule (every head would change its trainable part)")
    if cfg.train.precision != "float32":
        raise ConfigError("heads.grid: needs train.precision: float32 (one loss scale cannot serve every head)")
