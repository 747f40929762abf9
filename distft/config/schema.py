"""The job configuration's schema: one typed dataclass per section, every key with its default
and, in the comment at the field, its meaning (the config table in docs/config.md is generated
from these comments: `config/doc.py`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


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
    # several buckets let the first ones travel while backward still computes the rest.
    # `auto`: 8 MiB, but one bucket after backward where synchronized BatchNorm layers train
    # (their backward exchanges wait for the slower rank, and a gradient transfer running beside
    # them on shared cores makes the ranks drift apart: docs/benchmarks.md; measured on CPUs)
    bucket_bytes: Union[int, str] = field(default="auto", metadata=_at_least(0))
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
