"""What a run reports: summary.json, built from the run folder's log.jsonl so that it covers
every launch of the job (segments, history, validation), not only the last one."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

from distft import allocator
from distft.components.state import Batching, TrainState
from distft.errors import CheckpointError, mxnet_reason
from distft.files import atomic_write
from distft.runfolder import RunFolder


def read_log(path: str) -> list[dict]:
    records = []
    try:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
    except FileNotFoundError:
        pass
    return records


def segments(records: list[dict]) -> list[dict]:
    """One segment per launch that made progress: {world_size, start_step, end_step, samples,
    global_batch, windows, evals}. A launch ends at its last checkpoint (or its end); work
    after that was lost and is not counted, since the next launch resumed from there."""
    segs: list[dict] = []
    for r in records:
        event = r.get("event")
        if event == "start":
            segs.append({"world_size": r["world_size"], "global_batch": r["global_batch"],
                         "start_step": r["step"], "end_step": r["step"], "windows": [], "evals": []})
        elif not segs:
            continue  # written by a version of distft that marked no launches
        elif event in ("checkpoint", "end"):
            segs[-1]["end_step"] = max(segs[-1]["end_step"], r["step"])
        elif event == "eval":
            segs[-1]["evals"].append(r)
        elif event is None and "step" in r:
            segs[-1]["windows"].append(r)
    for seg, nxt in zip(segs, segs[1:] + [None]):
        if nxt is not None:  # the next launch resumed where this one's last complete checkpoint is
            # (its `checkpoint` line may be missing: a launch cut off while agreeing on it)
            seg["end_step"] = max(seg["start_step"], nxt["start_step"])
        seg["windows"] = [w for w in seg["windows"] if w["step"] <= seg["end_step"]]
        seg["evals"] = [e for e in seg["evals"] if e.get("step", 0) <= seg["end_step"]]
        seg["samples"] = (seg["end_step"] - seg["start_step"]) * seg["global_batch"]
    return [s for s in segs if s["end_step"] > s["start_step"] or s is segs[-1]]


def run_history(log_path: str) -> dict:
    """Segments, the window history and the validation history of every launch."""
    records = read_log(log_path)
    segs = segments(records)
    return {
        "segments": [{k: s[k] for k in ("world_size", "start_step", "end_step", "samples", "global_batch")}
                     for s in segs],
        "history": [w for s in segs for w in s["windows"]],
        "val_history": [{k: v for k, v in e.items() if k not in ("event", "time")} for s in segs for e in s["evals"]],
        # the supervisor's relaunches (launch.sh --max-restarts) that got as far as training
        "restarts": [{k: r.get(k) for k in ("at_step", "reason", "hosts", "world_size")}
                     for r in records if r.get("event") == "restart"],
    }


def completed(output: str, step: int) -> bool:
    """Whether train.output already holds the finished job at `step` (model and summary)."""
    try:
        with open(RunFolder(output).summary) as fh:
            done = json.load(fh).get("steps") == step
    except (OSError, ValueError):
        return False
    return done and os.path.isfile(RunFolder(output).model)


class Stats:
    """This launch's timing: data wait and step time per step, steady throughput (the first
    step builds graphs and allocates: not counted), per-epoch throughput."""

    def __init__(self):
        self.samples = self.steps = self.steady_samples = 0
        self.steady_seconds = self.data_seconds = self.compute_seconds = 0.0
        self.first_step_at = 0.0
        self.epochs: list = []
        self.bad_reported = 0
        self.exchange_seconds = 0.0
        self.last_step = self.last_wait = 0.0
        self._t_wait = self._t0 = 0.0
        self._epoch_seconds, self._epoch_steps = 0.0, 0

    def start_epoch(self) -> None:
        self._epoch_seconds, self._epoch_steps = 0.0, 0
        self.mark()

    def mark(self) -> None:
        """The host is ready for the next batch: from here on it waits for data."""
        self._t_wait = time.perf_counter()

    def begin_step(self) -> None:
        self._t0 = time.perf_counter()
        self.last_wait = self._t0 - self._t_wait
        self.data_seconds += self.last_wait

    def end_step(self, global_batch: int) -> None:
        t1 = time.perf_counter()
        self.last_step = t1 - self._t0
        self.compute_seconds += self.last_step
        self._epoch_seconds += t1 - self._t_wait
        self._epoch_steps += 1
        self.steps += 1
        self.samples += global_batch
        if self.steps == 1:
            self.first_step_at = time.time()
        else:  # data wait + step; not evaluation or checkpoints
            self.steady_seconds += t1 - self._t_wait
            self.steady_samples += global_batch

    def end_epoch(self, epoch: int, global_batch: int) -> None:
        if self._epoch_steps:
            self.epochs.append({"epoch": epoch, "steps": self._epoch_steps, "seconds": self._epoch_seconds,
                                "samples_per_sec": self._epoch_steps * global_batch / self._epoch_seconds
                                if self._epoch_seconds else None})

    def data_wait_share(self) -> float:
        busy = self.data_seconds + self.compute_seconds
        return self.data_seconds / busy if busy else 0.0

    def rate(self, wall: float) -> float:
        if self.steady_seconds:
            return self.steady_samples / self.steady_seconds
        return self.samples / wall if wall else 0.0


@dataclass
class LaunchRecord:
    """What summary.json reports of this launch beside its timing (`Stats`): the job gathers it
    at its end (`Job.record`)."""

    model: str
    classes: list  # by name
    data: dict  # per data set: its files and, per class, those read, unreadable (left out) and ignored
    state: TrainState
    steps_per_epoch: int
    batching: Batching
    started: float  # when the loop started (perf_counter; 0: it did not)
    plan_totals: dict  # FreezePlan.totals()
    frozen_prefix: list
    bytes_broadcast: int  # trainable state broadcast at start-up
    bytes_control: int  # config and frozen weight hashes, resume point
    allreduce_bytes_per_step: int
    allreduce_seconds: float
    gradient_buckets: Optional[int]  # allreduces per step of the gradient exchange (None: a solver's passes)
    synchronized_bn_layers: list
    bn_channel: Optional[str]
    bn_exchanges: dict
    exchange_overlapped: bool
    skipped_steps: int
    freeze_switches: list
    lr_mult: dict
    precision: str
    loss_scale: float
    loss_scale_overflows: int
    feature_cache: Optional[dict]  # hits, misses, file
    bad_samples: int
    forward_rate: Optional[float]  # samples/s of the forward pass alone, per rank
    metrics_port: Optional[int]
    ctx: object  # this rank's device
    optimum: Optional[dict] = None
    grid: Optional[dict] = None  # heads, best_head, heads_select


def compose(world, launch: LaunchRecord, stats: Stats, evals: dict, digests: list[str], output: str) -> dict:
    """summary.json: this launch's figures, and the history of every launch from log.jsonl."""
    state, t = launch.state, launch.plan_totals
    rss = [int(b) for b in world.allgather_json(peak_rss_bytes(), "distft.rss")]
    where = {"local_rank": world.local_rank, "cross_rank": world.cross_rank, "host": socket.gethostname()}
    placement = world.allgather_json(where, "distft.placement")
    wall = time.perf_counter() - launch.started if launch.started else 0.0
    rate = stats.rate(wall)
    runs = run_history(RunFolder(output).log) if world.rank == 0 else {}
    return {
        "model": launch.model,
        "classes": launch.classes,
        # per data set: its files and, per class, those read, unreadable (left out) and ignored
        "data": launch.data,
        "epochs": round(state.step / launch.steps_per_epoch, 3),
        "steps": state.step, "steps_this_run": stats.steps, "samples": state.samples,
        "global_batch": state.global_batch, "accumulation": launch.batching.accumulate,
        "micro_batch": launch.batching.micro,
        "samples_per_sec": rate, "samples_per_sec_per_rank": rate / world.size, "wall_seconds": wall,
        "data_wait_seconds": stats.data_seconds, "compute_seconds": stats.compute_seconds,
        # rank 0's share of step time spent waiting for data (over 0.2: loader-bound)
        "data_wait_share": stats.data_wait_share(),
        **{k: evals.get(k) for k in ("val_top1", "val_top5", "val_loss", "val_samples")},
        "trainable_params": t["trainable_params"], "frozen_params": t["frozen_params"],
        "trainable_bytes": t["trainable_bytes"], "frozen_bytes": t["frozen_bytes"],
        "frozen_prefix": launch.frozen_prefix,
        "world_size": world.size, "backend": world.backend,
        "horovod_cycle_ms": world.cycle_ms,  # HOROVOD_CYCLE_TIME in force (world.queue_cycle_ms)
        "horovod_fusion_bytes": world.fusion_bytes,  # HOROVOD_FUSION_THRESHOLD in force (world.FUSION_BUFFER_BYTES)
        "mpi_yield_when_idle": world.mpi_yield,  # OMPI_MCA_mpi_yield_when_idle in force (world.MPI_YIELD)
        # MXNet's CPU workspace copies (allocator.one_workspace_per_worker; None: MXNet's 4)
        "mxnet_cpu_temp_copy": allocator.temp_copies_set(),
        # what start-up moved: trainable state, plus control traffic (config and frozen
        # weight hashes, resume point)
        "bytes_broadcast": launch.bytes_broadcast + launch.bytes_control,
        "bytes_broadcast_trainable": launch.bytes_broadcast,
        "bytes_control": launch.bytes_control,
        "bytes_full_broadcast": t["total_bytes"] * (world.size > 1),
        "allreduce_bytes_per_step": launch.allreduce_bytes_per_step,
        "gradient_buckets": launch.gradient_buckets,  # dist.bucket_bytes resolved (exchange.bucket_bytes_for)
        "synchronized_bn_layers": launch.synchronized_bn_layers,
        "bn_channel": launch.bn_channel,
        # synchronized BN exchanges made in this launch, per direction (forward: one per layer;
        # backward: none for a layer whose input needs no gradient)
        "bn_exchanges": launch.bn_exchanges,
        # the exchange left in flight while the next batch starts (off: read before the update)
        "exchange_overlapped": launch.exchange_overlapped,
        "allreduce_seconds": launch.allreduce_seconds,
        "rank_state_digests": digests,
        "peak_rss_bytes": rss,  # per rank
        "rank_placement": placement,  # per rank: local_rank, cross_rank (node index), host
        "gpu_memory_used_bytes": gpu_memory_used(launch.ctx),
        "seconds_to_first_step": (stats.first_step_at - process_start_time()) if stats.first_step_at else None,
        "freeze_switches": launch.freeze_switches,
        "lr_mult": launch.lr_mult,
        "resumed": state.step > stats.steps,
        "skipped_steps": launch.skipped_steps,
        "precision": launch.precision,
        "loss_scale": launch.loss_scale, "loss_scale_overflows": launch.loss_scale_overflows,
        "feature_cache": launch.feature_cache,
        "bad_samples": launch.bad_samples,
        "forward_only_samples_per_sec_per_rank": launch.forward_rate,
        "throughput_vs_forward_only": (rate / world.size / launch.forward_rate) if launch.forward_rate else None,
        "metrics_port": launch.metrics_port,
        # per launch: world size, the steps it took (from its resume point to its last
        # checkpoint or its end) and their samples
        "segments": runs.get("segments", []),
        "restarts": runs.get("restarts", []),
        # every launch's validations and log windows (log.jsonl), lost work excluded
        "val_history": runs.get("val_history", []),
        # per epoch of this launch: samples/s over its steps (data wait included; evaluation
        # and checkpoints not); with the feature cache, epochs after the first show its effect
        "epoch_history": stats.epochs,
        "history": runs.get("history", []),
        # a head-only run: the objective (probe.py) and its gradient norm at the end (the best
        # head's); a solve adds its passes and `solver` (per head: iterations, status)
        **(launch.optimum or {}),
        **(launch.grid or {}),
    }


def write_outputs(out: str, models: dict, summary: dict) -> None:
    """`models`: {path: write(tmp path)}, model.params (and a grid's heads); then summary.json."""
    import shutil

    import mxnet as mx

    files = {**models, RunFolder(out).summary: lambda tmp: _write_json(tmp, summary)}
    for path, write in files.items():
        try:
            atomic_write(path, write)
        except (OSError, mx.base.MXNetError) as exc:
            reason = getattr(exc, "strerror", None) or mxnet_reason(exc)
            raise CheckpointError(f"train.output: writing {path} failed ({reason}; "
                                  f"{shutil.disk_usage(out).free:,} bytes free there); the last checkpoint "
                                  "is intact: free space and run the same command again") from None


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gpu_memory_used(ctx):
    """Bytes in use on this rank's GPU now (MXNet keeps its pool, so this is near the peak)."""
    if ctx.device_type != "gpu":
        return None
    import mxnet as mx

    free, total = mx.context.gpu_memory_info(ctx.device_id)
    return int(total - free)


def process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()
