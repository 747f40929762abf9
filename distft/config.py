"""Job configuration: YAML into typed dataclasses, `--set a.b=c` overrides, strict validation.

Every error names the key path (`optimizer.lr`) and, for a misspelt key, the nearest real one.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: PyYAML follows YAML 1.1, whose floats need
    a dot and a signed exponent, so `1e-3` (how everyone writes a learning rate) would be the
    string '1e-3'. YAML 1.2 reads it as a number, as JSON and Python do."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(stream) -> Any:
    """A YAML document as distft reads every config (YAML 1.2 floats; no arbitrary objects)."""
    return yaml.load(stream, Loader=YamlLoader)  # a SafeLoader: plain data only


def _choices(*values: str) -> dict:
    return {"choices": values}


def _at_least(low: float) -> dict:
    return {"min": low}


@dataclass
class ModelConfig:
    name: str = "resnet18_v2"  # any mxnet.gluon.model_zoo.vision network
    # classes of the new head; `auto`: the number of data.train's classes (an ImageFolder's
    # class folders, or a RecordIO file's largest label + 1)
    classes: Union[int, str] = field(default="auto", metadata=_at_least(1))
    # path to a .params file (saved with save_parameters), true (model-zoo cache) or false
    pretrained: Union[bool, str] = False
    # input size in pixels (square); too small for the network is an error naming the smallest that works
    image_size: int = field(default=224, metadata=_at_least(8))
    head: str = "output"  # the classifier block, initialised afresh (everything else is loaded)


@dataclass
class FreezeConfig:
    # block paths (`features.8`, `output`) or /regex/ over structural parameter names
    trainable: list[str] = field(default_factory=lambda: ["output"])
    # BatchNorm inside frozen blocks: `frozen` keeps pretrained statistics, `batch` re-estimates them
    batchnorm: str = field(default="frozen", metadata=_choices("frozen", "batch"))
    # gradual unfreezing: [{epoch: E, unfreeze: [paths], freeze: [paths]}], E below train.epochs
    schedule: list[dict] = field(default_factory=list)


@dataclass
class DataConfig:
    # ImageFolder directory, RecordIO .rec (with .idx beside it), `demo` or `demo-pretrain`
    train: str = "demo"
    # the validation set, same kinds; its classes are matched to data.train's by name (null: none)
    val: Optional[str] = None
    # instead of data.val: hold out this fraction of data.train for validation; it is never
    # trained on. A file is held out by a hash of its name and data.seed, so files added later
    # never move a trained-on sample into validation (or back)
    val_split: float = field(default=0.0, metadata=_at_least(0.0))
    batch_size: int = field(default=32, metadata=_at_least(1))  # per rank: the largest micro-batch
    # samples per optimizer step, all ranks together. The job's, not the launch's: default
    # batch_size x world size at the first launch, kept on any later world size by accumulating
    # gradients over micro-batches of at most batch_size
    global_batch: Optional[int] = field(default=None, metadata=_at_least(1))
    val_batch_size: Optional[int] = field(default=None, metadata=_at_least(1))  # per rank (null: batch_size)
    augment: bool = False  # random resized crop and horizontal flip, seeded per (seed, epoch, sample)
    seed: int = 0  # shuffling, sharding, augmentation and data.val_split
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # per channel (R, G, B), of 0..1
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # per channel (R, G, B), of 0..1
    # threads decoding images ahead of the training step
    workers: int = field(default=2, metadata=_at_least(0))
    # unreadable images are skipped (replaced by another sample of the batch) while there are at
    # most max(max_bad_fraction x files, max_bad_files) of them; past that the job stops naming one
    max_bad_fraction: float = field(default=0.001, metadata=_at_least(0.0))
    max_bad_files: int = field(default=10, metadata=_at_least(0))  # see max_bad_fraction
    # how samples go to ranks: `reshuffled` (every epoch's permutation split across ranks, so N
    # ranks take exactly the batches one process with an N-times batch takes) or `fixed` (each
    # rank keeps one shard for the whole run and reshuffles it; what a feature cache needs, and
    # it keeps a rank's reads on its own shard). `auto`: fixed when train.cache_features is on.
    shards: str = field(default="auto", metadata=_choices("auto", "reshuffled", "fixed"))
    # a relaunch finds data.train changed (files added, removed or resized since the checkpoint):
    # `error` refuses to resume; `accept` resumes on the data set as it is now
    on_change: str = field(default="error", metadata=_choices("error", "accept"))


@dataclass
class OptimizerConfig:
    # `sgd`, `nag`, `adam`; or `lbfgs`: a head-only plan (freeze.trainable: [the head], a Dense
    # layer) solved to its optimum by full-batch L-BFGS on the frozen features, one pass over
    # them per evaluation, capped by train.epochs (see the README)
    name: str = field(default="sgd", metadata=_choices("sgd", "nag", "adam", "lbfgs"))
    lr: float = field(default=0.01, metadata=_at_least(0.0))  # learning rate (before lr_scaling)
    momentum: float = field(default=0.9, metadata=_at_least(0.0))  # sgd/nag momentum; adam's beta1
    # applied to trainable weights only (biases and BatchNorm too with decay_bias_and_bn)
    weight_decay: float = field(default=1e-4, metadata=_at_least(0.0))
    # no weight decay on biases and BatchNorm gamma/beta (the usual fine-tuning recipe)
    decay_bias_and_bn: bool = False
    # learning-rate schedule: `constant`, `step` (step_epochs, step_factor) or `cosine` (to min_lr)
    schedule: str = field(default="constant", metadata=_choices("constant", "step", "cosine"))
    warmup_steps: int = field(default=0, metadata=_at_least(0))  # linear warm-up from 0 over this many steps
    step_epochs: list[int] = field(default_factory=list)  # `step`: epochs at which lr is multiplied by step_factor
    step_factor: float = field(default=0.1, metadata=_at_least(0.0))  # see step_epochs
    min_lr: float = field(default=0.0, metadata=_at_least(0.0))  # `cosine`: the final learning rate
    # `linear`: lr x global batch / data.batch_size (the job's global batch, whatever the
    # world size of this launch)
    lr_scaling: str = field(default="none", metadata=_choices("none", "linear"))
    # {block path or /regex/: multiplier}, e.g. {features: 0.1}
    lr_mult: dict[str, float] = field(default_factory=dict)
    # lbfgs: stop once the gradient's Euclidean norm (over the head's weight and bias) is at most this
    tol: float = field(default=1e-4, metadata=_at_least(0.0))
    # lbfgs: curvature pairs kept per head (2 x history x the head's size float64 numbers, in
    # memory and in checkpoints); `auto`: as many as fit in 256 MiB per head, 10 to 100 (more
    # pairs, fewer passes on a weakly penalised head)
    history: Union[int, str] = field(default="auto", metadata=_at_least(1))


@dataclass
class TrainConfig:
    # passes over data.train (optimizer.name: lbfgs: the most passes over the features, one per
    # evaluation of the objective; a pass is its step and its epoch)
    epochs: int = field(default=1, metadata=_at_least(1))
    max_steps: Optional[int] = field(default=None, metadata=_at_least(1))  # stop after this many steps (null: no limit)
    # run folder: checkpoints, model.params, classes.json, summary.json, config.yaml (resolved), log.jsonl
    output: str = "runs/distft"
    hybridize: bool = True  # static-memory cached graphs
    log_every: int = field(default=10, metadata=_at_least(1))  # steps per log line (or progress update)
    checkpoint_every_epochs: int = field(default=1, metadata=_at_least(0))  # 0: only at the end
    # also every N steps (lbfgs: every N passes, and at the end; not every epoch)
    checkpoint_every_steps: Optional[int] = field(default=None, metadata=_at_least(1))
    keep_checkpoints: int = field(default=3, metadata=_at_least(1))  # the newest N are kept
    resume: bool = True  # continue from the newest valid checkpoint in train.output
    seed: int = 0  # weight initialisation of the new head
    # `amp`: mixed precision (float16 on GPU with dynamic loss scaling, bfloat16 on CPU); weights,
    # optimizer state and checkpoints stay float32
    precision: str = field(default="float32", metadata=_choices("float32", "amp"))
    # keep the frozen prefix's output per sample (needs data.augment: false): later epochs
    # train the suffix from the cache. In memory up to cache_memory_bytes, else a file.
    cache_features: bool = False
    cache_dtype: str = field(default="float32", metadata=_choices("float32", "float16"))  # of the cached features
    # past this many bytes per rank the cache is a memory-mapped file under train.output/cache
    cache_memory_bytes: int = field(default=4 * 1024 ** 3, metadata=_at_least(0))
    # a step (or collective) not finishing in this many seconds aborts every rank (0: never)
    stall_timeout: float = field(default=300.0, metadata=_at_least(0.0))
    # after SIGTERM, a clean stop (agreed step, checkpoint) must happen within this many
    # seconds, else the rank exits at once (a peer is gone; Kubernetes' default grace is 30 s)
    preempt_grace: float = field(default=25.0, metadata=_at_least(1.0))
    # NaN/Inf in the loss or the (allreduced) gradients: `error` stops, `skip` drops the update
    # (a head of heads.grid that diverges is stopped alone instead)
    on_nonfinite: str = field(default="error", metadata=_choices("error", "skip"))
    # training targets (1 - e) x one-hot + e / classes (0: plain cross-entropy); validation
    # loss stays plain cross-entropy, so heads with different smoothing compare fairly
    label_smoothing: float = field(default=0.0, metadata=_at_least(0.0))


@dataclass
class DistConfig:
    # trainable BatchNorm across ranks: `sync` (global batch statistics) or `local`
    batchnorm: str = field(default="sync", metadata=_choices("sync", "local"))
    # how a synchronized BN's statistics cross ranks, apart from the gradient queue: `mpi`
    # (mpi4py on duplicates of MPI_COMM_WORLD: mpirun, horovodrun without --gloo, srun
    # --mpi=pmix), `horovod` (Horovod's allreduce), `auto` (mpi wherever MPI is up)
    bn_channel: str = field(default="auto", metadata=_choices("auto", "mpi", "horovod"))
    # gradients are allreduced in buckets of about this many bytes (0: one call per tensor);
    # several buckets let the first ones travel while backward still computes the rest
    bucket_bytes: int = field(default=8 * 1024 * 1024, metadata=_at_least(0))
    compression: str = field(default="none", metadata=_choices("none", "fp16"))  # gradients on the wire
    # Horovod's: divide gradients by this before the allreduce and by world size / this after
    gradient_predivide_factor: float = field(default=1.0, metadata=_at_least(1e-6))
    # frozen weights that differ between ranks: `error` stops the job, `broadcast` fixes them
    on_frozen_mismatch: str = field(default="error", metadata=_choices("error", "broadcast"))
    # trainable weights and moving BN statistics at start: `verify` hashes them on every rank
    # and broadcasts only those that differ from rank 0's (every rank loaded the same pretrained
    # file and seed, so usually none); `broadcast` always sends them all from rank 0
    trainable_start: str = field(default="verify", metadata=_choices("verify", "broadcast"))


@dataclass
class MetricsConfig:
    # each rank serves /metrics on port + local_rank (0: no exporter)
    port: int = field(default=9400, metadata=_at_least(0))
    bind: str = "0.0.0.0"  # address the exporter listens on
    # a port already taken: `error`, or `next` (the next free port of this rank's stride)
    on_port_in_use: str = field(default="error", metadata=_choices("error", "next"))
    job: str = ""  # the `job` label (default: the name of train.output)
    pushgateway: Optional[str] = None  # e.g. http://pushgateway:9091
    push_every_steps: int = field(default=0, metadata=_at_least(0))  # 0: only at the end
    linger_seconds: float = field(default=0.0, metadata=_at_least(0.0))  # keep serving after the end
    # forward-only batches timed at start-up (the throughput limit); 0 skips the probe
    probe_batches: int = field(default=5, metadata=_at_least(0))
    # rank 0's progress line: `auto` draws it on a terminal, but not under a launcher (mpirun,
    # horovodrun, srun), where ranks log plain lines; `on`, `off`
    progress: str = field(default="auto", metadata=_choices("auto", "on", "off"))
    report: bool = True  # report.png beside summary.json


# the keys heads.grid may vary: what one copy of the trainable part can have of its own
GRID_KEYS = ("optimizer.lr", "optimizer.weight_decay", "optimizer.momentum", "optimizer.lr_mult",
             "train.label_smoothing")


@dataclass
class HeadsConfig:
    # {key: [values]}: one head per point of the product (named h0, h1, ... with the last key
    # varying fastest), all trained on the same batches from one frozen-prefix pass. Keys:
    # optimizer.lr, optimizer.weight_decay, optimizer.momentum, optimizer.lr_mult (a list of
    # mappings), train.label_smoothing
    grid: dict = field(default_factory=dict)
    # the best head by validation (written to model.params): `val_top1` (highest) or `val_loss` (lowest)
    select: str = field(default="val_top1", metadata=_choices("val_top1", "val_loss"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def fixed_shards(self) -> bool:
        """Whether each rank keeps one shard of data.train for the whole run."""
        return self.data.shards == "fixed" or (self.data.shards == "auto" and self.train.cache_features)


# --- loading --------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    """What a list of `tp` holds, as a sentence says it: `a list of strings`."""
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(
        tp, f"items ({_type_name(tp)})")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_convert(k, key_tp, f"{path}"): _convert(v, val_tp, f"{path}.{_part(k)}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{path}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _part(key: Any) -> str:
    """A key as it appears in an error path: plain when it is a plain name, else quoted (so a
    key with a newline cannot break the one-line error)."""
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_\-]+", text) else repr(key)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = path or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{_part(key)}" if path else _part(key)
        if key not in fields:
            known = [f"{path}.{name}" if path else name for name in fields]
            raise ConfigError(f"{key_path}: unknown key{_suggest(key_path, known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, key_path)
            continue
        converted = _convert(value, tp, key_path)
        meta = fields[key].metadata
        if "choices" in meta and converted not in meta["choices"]:
            raise ConfigError(f"{key_path}: must be one of {', '.join(meta['choices'])}, "
                              f"got {converted!r}{_suggest(str(converted), list(meta['choices']))}")
        if "min" in meta and isinstance(converted, (int, float)) and converted < meta["min"]:
            raise ConfigError(f"{key_path}: must be >= {meta['min']}, got {converted!r}")
        kwargs[key] = converted
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    if isinstance(cfg.optimizer.history, str) and cfg.optimizer.history != "auto":
        raise ConfigError(f"optimizer.history: expected an integer or auto, got {cfg.optimizer.history!r}")
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
            raise ConfigError(f"{where}.{_part(key)}: unknown key{_suggest(str(key), ['epoch', 'unfreeze', 'freeze'])}")
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
            converted = _convert(value, tp, f"{path}[{i}]")
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], c); the value is read as YAML so `true`, `0.1`, `[a, b]` work."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text}: bad key path {key!r}")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from None
    return parts, value


def apply_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    raw: Any = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path) as fh:
                raw = read_yaml(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(raw, parts, value)
    cfg = _build(Config, raw, "")
    _check(cfg)
    return cfg


def as_yaml(value: Any) -> str:
    """A value as a config file writes it: false, [features.8, output], 0.001, null."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
