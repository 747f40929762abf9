"""`distft bench`: distft, the plain Horovod baseline (distft/baseline.py) and the forward-only
limit, on this machine, in one invocation, with the same model, freeze plan, batch and data.
Throughput is the median over windows of `window` steps, the first window (warm-up) excluded;
with `repeats` > 1 the three runs are repeated in turn and each figure is the median of its runs.
A fourth run, distft with the feature cache over `cache_epochs` epochs, gives the epoch
throughput once the cache is filled (the median over epochs after the first)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

from distft.allocator import temp_copies_set
from distft.bench import timeline
from distft.config import dump_config, load_config
from distft.distributed.world import MPI_YIELD, horovod_cycle_ms, horovod_has_mpi
from distft.errors import ConfigError, DistftError
from distft.models import network
from distft.runfolder import RunFolder
from distft.train.grid import grid_points

GRID_VAL_SPLIT = 0.05  # a grid needs validation data; the one-head run holds out the same samples


def prepare_output(path: str, flag: str) -> None:
    """Before a benchmark that takes minutes: make PATH's folder and prove a file can be written
    there, else a one-line error naming `flag`."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag}: {path}: a folder; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".distft-write-test-")
        os.close(fd)
        os.remove(probe)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            blocking = directory
            while not os.path.exists(blocking):
                blocking = os.path.dirname(blocking)
            reason = f"{blocking} is a file, not a folder"
        raise ConfigError(f"{flag}: {path}: cannot write there ({reason})") from None


def _machine() -> dict:
    import mxnet as mx

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    gpus = mx.context.num_gpus()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "python": platform.python_version(),
            "mxnet": mx.__version__, "platform": platform.platform()}


def _run(cmd: list, what: str, timeout: int, env: dict | None = None) -> None:
    # a timeline is only taken where asked for: it slows the run it traces
    base = {k: v for k, v in os.environ.items() if k != "HOROVOD_TIMELINE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})})
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise DistftError(f"bench: the {what} run failed (exit {proc.returncode}):\n{tail}")


def default_controller() -> str:
    """The controller horovodrun itself picks when given neither --gloo nor --mpi: MPI when
    Horovod was built with it, else Gloo."""
    return "mpi" if horovod_has_mpi() else "gloo"


def run(config: str, overrides: list, np_: int, steps: int, window: int, controller: str = "auto",
        timeout: int = 3600, cache_epochs: int = 3, repeats: int = 1, trace: bool = True) -> dict:
    if steps < 3 * window:
        raise DistftError(f"bench: --steps {steps} must be at least 3 windows of {window}")
    if repeats < 1:
        raise DistftError(f"bench: --repeats {repeats}: at least 1")
    if cache_epochs == 1 or cache_epochs < 0:
        raise DistftError(f"bench: --cache-epochs {cache_epochs}: 0 (no cached run) or at least 2")
    if controller == "auto":
        controller = default_controller()
    first = load_config(config, overrides + ["data.val=null", f"data.val_split={GRID_VAL_SPLIT}"])
    if first.optimizer.name == "lbfgs":
        raise DistftError("bench: optimizer.name: lbfgs takes no steps to time; `python -m distft.bench.probebench "
                          "--config X --np N` puts it beside scikit-learn on the same features")
    network.check(first.model)  # before any run reads data
    if first.heads.grid:
        return run_grid(config, overrides, np_, steps, window, controller, timeout, cache_epochs, repeats)
    work = tempfile.mkdtemp(prefix="distft-bench-")
    try:
        common = overrides + ["data.val=null", "metrics.port=0", "metrics.report=false", "train.resume=false",
                              "train.checkpoint_every_epochs=0",
                              # the limit is measured as its own run here
                              "metrics.probe_batches=0"]
        cfg = _timed_job(config, common, steps, window, os.path.join(work, "distft"))
        job = os.path.join(work, "job.yaml")
        dump_config(cfg, job)
        launcher = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(np_), f"--{controller}"]
        results, summary = _rounds(launcher, job, work, steps, window, repeats, timeout)
        if cache_epochs:
            results["cached"] = _cached(config, common, cache_epochs, job, work, launcher, timeout)
        sync_bn = None
        if summary.get("synchronized_bn_layers", 0):
            sync_bn = _sync_bn_floor(cfg, summary, work, launcher, timeout)
            if trace and sync_bn["channel"] == "horovod":  # only then are they in Horovod's timeline
                sync_bn["in_training"] = _traced(config, common, steps, window, work, launcher, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = _figures(cfg, results, summary, np_, steps, window, repeats, controller)
    if sync_bn is not None:
        out["sync_bn"] = _sync_bn_figures(sync_bn, summary, results)
    if "cached" in results:
        c, b = results["cached"], results["baseline"]
        # the baseline's steady rate is its epoch throughput (every epoch costs the same), warm-up excluded
        out["cache"] = {"epochs": cache_epochs, "epoch_samples_per_sec": c["epoch_samples_per_sec"],
                        "augment": False}
        out["samples_per_sec"]["distft_cached"] = c["samples_per_sec"]
        out["ratios"]["cached_over_baseline"] = c["samples_per_sec"] / b["samples_per_sec"]
    return out


def _rounds(launcher: list, job: str, work: str, steps: int, window: int, repeats: int, timeout: int) -> tuple:
    """The limit, the baseline and distft, in turn `repeats` times (interleaved, so a slow spell
    of a shared machine hits all three): their combined results, and distft's last summary."""
    rounds = []
    for _ in range(repeats):
        results = {}
        for mode in ("limit", "baseline"):
            out = os.path.join(work, f"{mode}.json")
            _run(launcher + [sys.executable, "-m", "distft.bench.baseline", "--config", job, "--mode",
                             "limit" if mode == "limit" else "train", "--steps", str(steps + 1),
                             "--window", str(window), "--out", out], mode, timeout)
            with open(out) as fh:
                results[mode] = json.load(fh)
        _run(launcher + [sys.executable, "-m", "distft", "--config", job], "distft", timeout)
        summary = _summary(os.path.join(work, "distft"))
        windows = [h["samples_per_sec"] for h in summary["history"]]
        results["distft"] = {"samples_per_sec": statistics.median(windows[1:]),
                             "window_samples_per_sec": windows,
                             "peak_rss_bytes": summary["peak_rss_bytes"],
                             "bytes_broadcast": summary["bytes_broadcast"],
                             "allreduce_bytes_per_step": summary["allreduce_bytes_per_step"],
                             "seconds_to_first_step": summary["seconds_to_first_step"]}
        rounds.append(results)
    return _combine(rounds), summary


def _cached(config: str, common: list, cache_epochs: int, job: str, work: str, launcher: list, timeout: int) -> dict:
    """distft with the feature cache for `cache_epochs` epochs: samples/s per epoch."""
    cached = load_config(config, common + [
        "train.cache_features=true", "data.augment=false", "train.max_steps=null",
        f"train.epochs={cache_epochs}", "train.log_every=1000000",
        f"train.output={os.path.join(work, 'cached')}"])
    dump_config(cached, job)
    _run(launcher + [sys.executable, "-m", "distft", "--config", job], "cached distft", timeout)
    epochs = _summary(os.path.join(work, "cached"))["epoch_history"]
    return {"epoch_samples_per_sec": [e["samples_per_sec"] for e in epochs],
            "samples_per_sec": statistics.median(e["samples_per_sec"] for e in epochs[1:])}


def _sync_bn_floor(cfg, summary: dict, work: str, launcher: list, timeout: int) -> dict:
    """One exchange of a synchronized BN layer of the job's last stage, timed alone
    (distft.bench.syncbench), with the layers and exchanges the job counted."""
    floor = os.path.join(work, "syncbn.json")
    spatial = max(1, -(-cfg.model.image_size // 32))  # a ResNet's last stage
    _run(launcher + [sys.executable, "-m", "distft.bench.syncbench", "--spatial", str(spatial), "--batches",
                     f"{cfg.data.batch_size},{4 * cfg.data.batch_size}", "--out", floor],
         "synchronized BatchNorm floor", timeout)
    with open(floor) as fh:
        sync_bn = json.load(fh)
    sync_bn["layers"], sync_bn["channel"] = summary["synchronized_bn_layers"], summary["bn_channel"]
    sync_bn["exchanges_per_step"] = {k: v / summary["steps_this_run"] for k, v in summary["bn_exchanges"].items()}
    return sync_bn


def _figures(cfg, results: dict, summary: dict, np_: int, steps: int, window: int, repeats: int,
             controller: str) -> dict:
    d, b, lim = (results[k] for k in ("distft", "baseline", "limit"))
    return {
        "model": cfg.model.name, "image_size": cfg.model.image_size, "trainable": cfg.freeze.trainable,
        "batch_size_per_rank": cfg.data.batch_size, "world_size": np_, "steps": steps, "window": window,
        "repeats": repeats, "controller": controller,
        # Horovod's cycle in each: distft's own choice (world.queue_cycle_ms), the baseline's
        # from the environment or Horovod's default
        "horovod_cycle_ms": {"distft": summary.get("horovod_cycle_ms"), "baseline": horovod_cycle_ms(os.environ)},
        # Open MPI's yield while waiting (world.MPI_YIELD): distft's, the baseline's from the
        # environment (None: Open MPI's default, busy polling unless oversubscribed)
        "mpi_yield_when_idle": {"distft": summary.get("mpi_yield_when_idle"),
                                "baseline": os.environ.get(MPI_YIELD)},
        # MXNet's CPU workspace copies (MXNET_CPU_TEMP_COPY): distft's, the baseline's from the
        # environment (None: MXNet's default, 4)
        "mxnet_cpu_temp_copy": {"distft": summary.get("mxnet_cpu_temp_copy"),
                                "baseline": temp_copies_set(os.environ)},
        "samples_per_sec": {"distft": d["samples_per_sec"], "baseline": b["samples_per_sec"],
                            "limit": lim["samples_per_sec"]},
        "ratios": {"distft_over_baseline": d["samples_per_sec"] / b["samples_per_sec"],
                   "distft_over_limit": d["samples_per_sec"] / lim["samples_per_sec"],
                   # each run's largest rank, the largest over the repeats
                   "peak_rss_distft_over_baseline": max(d["peak_rss_bytes"]) / max(b["peak_rss_bytes"])},
        "peak_rss_bytes": {"distft": max(d["peak_rss_bytes"]), "baseline": max(b["peak_rss_bytes"]),
                           "limit": max(lim["peak_rss_bytes"])},
        "bytes_broadcast": {"distft": d["bytes_broadcast"], "baseline": b["bytes_broadcast"]},
        # DistributedTrainer allreduces every parameter whose grad_req is not 'null': the same set
        "allreduce_bytes_per_step": {"distft": d["allreduce_bytes_per_step"],
                                     "baseline": summary["trainable_bytes"] if np_ > 1 else 0},
        "seconds_to_first_step": {"distft": d["seconds_to_first_step"], "baseline": b["seconds_to_first_step"]},
        "windows": {k: v["window_samples_per_sec"] for k, v in results.items() if "window_samples_per_sec" in v},
        "rounds": {k: v["round_samples_per_sec"] for k, v in results.items() if "round_samples_per_sec" in v},
        "machine": _machine(),
    }


def _sync_bn_figures(sync_bn: dict, summary: dict, results: dict) -> dict:
    """The floor the exchanges put under a step, against the baseline's step."""
    # the exchanges a step waits for, one after another (each layer needs the one before):
    # each layer's statistics in forward, its two gradient sums in backward (none where its
    # input needs no gradient), per micro-batch, as counted in training
    exchanges = sum(sync_bn["exchanges_per_step"].values())
    floor_s = exchanges * sync_bn["exchange_us"][sync_bn["channel"]] / 1e6
    # the baseline's time for the samples of one distft step (which may hold several micro-batches)
    baseline_step_s = summary["global_batch"] / results["baseline"]["samples_per_sec"]
    fraction = floor_s / baseline_step_s
    out = {**sync_bn, "floor_ms_per_step": floor_s * 1e3, "floor_fraction_of_baseline_step": fraction,
           # with nothing else running during an exchange, distft can at best
           # take the baseline's step plus the floor
           "bound_distft_over_baseline": 1 / (1 + fraction)}
    if "steps" in sync_bn.get("in_training", {}):
        out["in_training"]["untraced_step_ms"] = summary["global_batch"] / results["distft"]["samples_per_sec"] * 1e3
    return out


def _timed_job(config: str, overrides: list, steps: int, window: int, output: str):
    """The job's config for a run of `steps` steps logged every `window` (its samples/s windows)."""
    return load_config(config, overrides + [f"train.max_steps={steps}", "train.epochs=100000",
                                            f"train.log_every={window}", f"train.output={output}"])


def _traced(config, common, steps, window, work, launcher, timeout) -> dict:
    """The same job once more with Horovod's timeline on (not timed: the timeline slows it),
    summarised per step; what went wrong instead, so that the timed figures are not lost."""
    trace, job = os.path.join(work, "timeline.json"), os.path.join(work, "traced.yaml")
    try:
        dump_config(_timed_job(config, common, steps, window, os.path.join(work, "traced")), job)
        _run(launcher + [sys.executable, "-m", "distft", "--config", job], "distft (timeline)", timeout,
             env={"HOROVOD_TIMELINE": trace})
        return timeline.summarise(timeline.load(trace), skip=min(5, steps // 3))
    except Exception as e:  # noqa: BLE001 - an extra measurement: whatever fails, the timed figures stand
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        return {"error": lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"}


def _combine(rounds: list) -> dict:
    """Per run: the median over repeats of samples/s, the largest peak memory, the first run's
    byte counts; every round's windows are kept."""
    out = {}
    for mode in rounds[0]:
        runs = [r[mode] for r in rounds]
        merged = dict(runs[0])
        merged["samples_per_sec"] = statistics.median(r["samples_per_sec"] for r in runs)
        merged["round_samples_per_sec"] = [r["samples_per_sec"] for r in runs]
        merged["peak_rss_bytes"] = [max(vals) for vals in zip(*(r["peak_rss_bytes"] for r in runs))]
        merged["window_samples_per_sec"] = [w for r in runs for w in r["window_samples_per_sec"]]
        if "seconds_to_first_step" in merged:
            merged["seconds_to_first_step"] = statistics.median(r["seconds_to_first_step"] for r in runs)
        out[mode] = merged
    return out


def _summary(directory: str) -> dict:
    with open(RunFolder(directory).summary) as fh:
        return json.load(fh)


def _grid_round(config: str, overrides: list, steps: int, window: int, cache_epochs: int, launcher: list,
                out: str, mode: str, timeout: int) -> tuple[dict, Optional[dict]]:
    """One round of `mode` (the grid, or its first point alone): steady samples/s over the
    windows after the first, peak memory, bytes per step; with `cache_epochs`, the same job
    again with the feature cache (its epochs' samples/s; None without)."""
    job = out + ".yaml"
    dump_config(_timed_job(config, overrides, steps, window, out), job)
    _run(launcher + [sys.executable, "-m", "distft", "--config", job], f"distft ({mode})", timeout)
    s = _summary(out)
    windows = [h["samples_per_sec"] for h in s["history"]]
    plain = {"samples_per_sec": statistics.median(windows[1:]), "windows": windows,
             "peak_rss_bytes": max(s["peak_rss_bytes"]), "allreduce_bytes_per_step": s["allreduce_bytes_per_step"]}
    if not cache_epochs:
        return plain, None
    out = out + "-cached"
    dump_config(load_config(config, overrides + [
        "train.cache_features=true", "data.augment=false", "train.max_steps=null",
        f"train.epochs={cache_epochs}", "train.log_every=1000000", f"train.output={out}"]), job)
    _run(launcher + [sys.executable, "-m", "distft", "--config", job], f"cached distft ({mode})", timeout)
    epochs = [e["samples_per_sec"] for e in _summary(out)["epoch_history"]]
    return plain, {"epochs": epochs, "samples_per_sec": statistics.median(epochs[1:])}


def run_grid(config: str, overrides: list, np_: int, steps: int, window: int, controller: str = "mpi",
             timeout: int = 3600, cache_epochs: int = 3, repeats: int = 1) -> dict:
    """distft with heads.grid (K heads) and with one head (the grid's first point alone), in turn
    `repeats` times: steady samples/s (median over windows after the first, then over repeats),
    peak memory, and what a sweep of K points costs in one run against K runs. With
    `cache_epochs`, both again with the feature cache: epochs after the first."""
    cfg = load_config(config, overrides + ["data.val=null", f"data.val_split={GRID_VAL_SPLIT}"])
    points = grid_points(cfg.heads.grid)
    one_head = ["heads.grid={}"] + [f"{k}={json.dumps(v)}" for k, v in points[0].overrides.items()]
    work = tempfile.mkdtemp(prefix="distft-bench-grid-")
    launcher = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(np_), f"--{controller}"]
    common = overrides + ["data.val=null", f"data.val_split={GRID_VAL_SPLIT}", "metrics.port=0",
                          "metrics.report=false", "train.resume=false", "train.checkpoint_every_epochs=0",
                          "metrics.probe_batches=0"]
    runs = {"grid": [], "one": []}
    cached: dict = {"grid": [], "one": []}
    try:
        for r in range(repeats):  # interleaved, so a slow spell of a shared machine hits both
            for mode, extra in (("grid", []), ("one", one_head)):
                plain, with_cache = _grid_round(config, common + extra, steps, window, cache_epochs, launcher,
                                                os.path.join(work, f"{mode}-{r}"), mode, timeout)
                runs[mode].append(plain)
                if with_cache is not None:
                    cached[mode].append(with_cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    k = len(points)

    def median(mode, key, source=runs):
        return statistics.median(x[key] for x in source[mode])

    out = {
        "model": cfg.model.name, "image_size": cfg.model.image_size, "trainable": cfg.freeze.trainable,
        "batch_size_per_rank": cfg.data.batch_size, "world_size": np_, "steps": steps, "window": window,
        "repeats": repeats, "heads": k, "grid": cfg.heads.grid, "controller": controller,
        "samples_per_sec": {"grid": median("grid", "samples_per_sec"), "one_head": median("one", "samples_per_sec")},
        "rounds": {"grid": [x["samples_per_sec"] for x in runs["grid"]],
                   "one_head": [x["samples_per_sec"] for x in runs["one"]]},
        "peak_rss_bytes": {"grid": max(x["peak_rss_bytes"] for x in runs["grid"]),
                           "one_head": max(x["peak_rss_bytes"] for x in runs["one"])},
        "allreduce_bytes_per_step": {"grid": runs["grid"][0]["allreduce_bytes_per_step"],
                                     "one_head": runs["one"][0]["allreduce_bytes_per_step"]},
        "machine": _machine(),
    }
    rates = out["samples_per_sec"]
    # the time of one K-point sweep over the time of K single runs of the same samples
    out["grid_over_one_head"] = rates["grid"] / rates["one_head"]
    out["sweep_cost_vs_separate_runs"] = rates["one_head"] / (k * rates["grid"])
    if cache_epochs:
        out["cache"] = {"epochs": cache_epochs,
                        "epoch_samples_per_sec": {"grid": [x["epochs"] for x in cached["grid"]],
                                                  "one_head": [x["epochs"] for x in cached["one"]]},
                        "samples_per_sec": {"grid": median("grid", "samples_per_sec", cached),
                                            "one_head": median("one", "samples_per_sec", cached)}}
        c = out["cache"]["samples_per_sec"]
        out["cache"]["sweep_cost_vs_separate_runs"] = c["one_head"] / (k * c["grid"])
    return out
