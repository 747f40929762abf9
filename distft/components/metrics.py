"""Observability: a Prometheus exporter per rank, job-wide figures on rank 0, an optional
Pushgateway push, a JSON-lines log, a progress line and report.png.

Metric names follow Prometheus conventions: distft_<what>_<base unit>, counters end in _total,
labels are job, rank, local_rank, host (and phase for the time split) and nothing unbounded.

The metrics port also answers `/healthz` (a liveness probe): 200 while steps finish, 503 once
none has finished for `train.stall_timeout` seconds. Every other path serves the metrics.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np

from distft.console import draw_progress, end_progress_line, log, warn
from distft.errors import ConfigError
from distft.launchenv import under_launcher
from distft.runfolder import RunFolder

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PHASES = ("data", "compute", "allreduce")
DATA_WAIT_WARN = 0.20  # a larger share of step time waiting for data: the loader sets the pace


def progress_wanted(setting: str, isatty: bool, env) -> bool:
    """metrics.progress: `on`, `off`, or `auto`: on a terminal, and not under a launcher (which
    may give a rank a terminal whose output goes to a file: `\r` lines would fill the log)."""
    if setting != "auto":
        return setting == "on"
    return isatty and not under_launcher(env)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # a scrape every 15 s is not news
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Metrics:
    def __init__(self, cfg, world, output: str, log_every: int, stall_timeout: float = 0.0,
                 heads: Optional[list] = None):
        self.cfg, self.world, self.output = cfg, world, output
        self.log_every = log_every
        self.job = cfg.job or os.path.basename(os.path.abspath(output)) or "distft"
        self.labels = {"job": self.job, "rank": str(world.rank), "local_rank": str(world.local_rank),
                       "host": socket.gethostname()}
        self.heads = heads
        self._declare_series(heads)
        self.world_size.labels(**self.labels).set(world.size)
        self._window = {"samples": 0, "start": time.perf_counter(), "steps": 0, "step_seconds": 0.0, "data_seconds": 0.0}
        self._warned_data_wait = False
        self.history: list[dict] = []
        self.server = None
        self.port: Optional[int] = None
        self._jsonl = None
        self._progress = world.rank == 0 and progress_wanted(cfg.progress, sys.stdout.isatty(), os.environ)
        self._last_push = 0
        self.stall_timeout = stall_timeout
        self.progressed_at = time.monotonic()  # start-up counts as progress until the first step

    def _declare_series(self, heads: Optional[list]) -> None:
        """The Prometheus series of this rank (per-head ones labelled `head` for a grid)."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        names = list(self.labels)
        r = self.registry

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, names + list(extra), registry=r)

        self.samples = Counter("distft_samples", "Training samples processed by this rank", names, registry=r)
        self.steps = Counter("distft_steps", "Optimizer steps taken", names, registry=r)
        self.rate = gauge("distft_samples_per_second", "This rank's training samples/s over the last log window")
        self.step_time = Histogram("distft_step_duration_seconds", "Wall time of one training step", names,
                                   buckets=STEP_BUCKETS, registry=r)
        self.phase = Counter("distft_step_phase_seconds", "Step time split into data wait, compute and "
                             "allreduce (time spent waiting for the gradient exchange; the rest overlaps compute)", names + ["phase"], registry=r)
        self.allreduce_bytes = Counter("distft_allreduce_bytes", "Gradient bytes allreduced by this rank",
                                       names, registry=r)
        self.broadcast_bytes = Counter("distft_broadcast_bytes", "Bytes broadcast or exchanged at start-up",
                                       names, registry=r)
        self.trainable = gauge("distft_trainable_parameters", "Trainable parameters (scalars)")
        self.frozen = gauge("distft_frozen_parameters", "Frozen parameters and statistics (scalars)")
        # a grid's per-head series carry a `head` label (h0, h1, ...: as many as grid points)
        per_head = ["head"] if heads else []
        self.loss = gauge("distft_loss", "Training loss (mean over the last step's batch)", per_head)
        self.lr = gauge("distft_learning_rate", "Learning rate", per_head)
        self.epoch = gauge("distft_epoch", "Current epoch")
        self.val_top1 = gauge("distft_validation_top1_ratio", "Validation top-1 accuracy", per_head)
        self.val_top5 = gauge("distft_validation_top5_ratio", "Validation top-5 accuracy", per_head)
        self.forward_rate = gauge("distft_forward_only_samples_per_second",
                                  "Forward-only (inference) samples/s of the same model and batch, "
                                  "measured at start-up: the limit of a head-only fine-tune")
        self.data_wait = gauge("distft_data_wait_ratio", "Share of this rank's step time (data wait + step) "
                               "spent waiting for its next batch, over the last log window")
        self.vs_forward = gauge("distft_throughput_vs_forward_only_ratio",
                                "Training samples/s divided by forward-only samples/s (like MFU)")
        # job-wide, on rank 0
        self.job_rate = gauge("distft_job_samples_per_second", "Training samples/s summed over all ranks")
        self.slowest = gauge("distft_slowest_rank_step_seconds", "Mean step time of the slowest rank "
                             "over the last log window")
        self.slowest_rank = gauge("distft_slowest_rank", "Rank with the longest mean step time")
        self.skipped_steps = Counter("distft_skipped_steps", "Updates skipped for NaN/Inf "
                                     "(train.on_nonfinite: skip)", names, registry=r)
        self.bad_samples = Counter("distft_bad_samples", "Unreadable samples skipped", names, registry=r)
        self.restarts = Counter("distft_restarts", "Relaunches of the job by launch.sh --max-restarts, by reason "
                                "(node_lost, stall, rank_lost, startup, grow)", names + ["reason"], registry=r)
        self.world_size = gauge("distft_world_size", "Number of ranks")

    @property
    def shows_progress(self) -> bool:
        """Rank 0 on a terminal draws a progress line instead of log lines."""
        return self._progress

    # --- serving ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.world.rank == 0:
            self._jsonl = open(RunFolder(self.output).log, "a", buffering=1)
        if not self.cfg.port:
            return
        base = self.cfg.port + self.world.local_rank
        tries = [base] if self.cfg.on_port_in_use == "error" else \
            [base + k * self.world.local_size for k in range(32)]
        last = None
        for port in tries:
            try:
                self.server = self._serve(port)
                self.port = port
                return
            except OSError as exc:
                last = exc
        raise ConfigError(f"metrics.port: cannot serve metrics on {self.cfg.bind}:{tries[-1] if len(tries) == 1 else base}"
                          f" (port + local_rank {self.world.local_rank}): {last.strerror or last}; "
                          "choose another metrics.port, set metrics.on_port_in_use: next, or 0 to turn it off")

    def _serve(self, port: int):
        from prometheus_client import make_wsgi_app

        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/healthz":
                ok, text = self.health()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [text.encode() + b"\n"]
            return metrics_app(environ, start_response)

        server_class = type("MetricsServer", (_Server,),
                            {"address_family": socket.AF_INET6 if ":" in self.cfg.bind else socket.AF_INET})
        server = make_server(self.cfg.bind, port, app, server_class, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="distft-metrics", daemon=True)
        thread.start()
        return server, thread

    def health(self) -> tuple[bool, str]:
        """Liveness: did a step finish within train.stall_timeout (0: no limit)?"""
        idle = time.monotonic() - self.progressed_at
        if self.stall_timeout and idle > self.stall_timeout:
            return False, (f"stalled: no step finished for {idle:.0f} s "
                           f"(train.stall_timeout {self.stall_timeout:g} s)")
        return True, f"ok: last step {idle:.1f} s ago"

    def child(self, metric, **extra):
        return metric.labels(**self.labels, **extra)

    # --- figures ------------------------------------------------------------------------------
    def startup(self, totals: dict, bytes_broadcast: int, forward_rate: Optional[float]) -> None:
        self.child(self.trainable).set(totals["trainable_params"])
        self.child(self.frozen).set(totals["frozen_params"])
        self.child(self.broadcast_bytes).inc(bytes_broadcast)
        if forward_rate:
            self.child(self.forward_rate).set(forward_rate)
        self.forward = forward_rate

    def step(self, *, samples: int, seconds: float, data: float, allreduce: float, allreduce_bytes: int,
             loss: float, lr: float, epoch: int, heads: Optional[dict] = None) -> None:
        """`heads` (a grid): {head: {loss, lr}}, the per-head series in place of loss and lr."""
        self.progressed_at = time.monotonic()
        self.child(self.samples).inc(samples)
        self.child(self.steps).inc()
        self.child(self.step_time).observe(seconds)
        self.child(self.phase, phase="data").inc(data)
        self.child(self.phase, phase="allreduce").inc(allreduce)
        self.child(self.phase, phase="compute").inc(max(seconds - data - allreduce, 0.0))
        self.child(self.allreduce_bytes).inc(allreduce_bytes)
        for labels, figures in ({(): {"loss": loss, "lr": lr}} if heads is None else
                                {(("head", h),): v for h, v in heads.items()}).items():
            self.child(self.loss, **dict(labels)).set(figures["loss"])
            self.child(self.lr, **dict(labels)).set(figures["lr"])
        self.child(self.epoch).set(epoch)
        w = self._window
        w["samples"] += samples
        w["steps"] += 1
        w["step_seconds"] += seconds + data
        w["data_seconds"] += data

    def window(self, *, global_step: int, total_steps: int, epoch: int, loss: float, lr: float,
               heads: Optional[dict] = None) -> dict:
        """Close a log window: every rank reports its rate and mean step time; rank 0 sets the
        job-wide figures. Collective: all ranks call it at the same steps."""
        w = self._window
        now = time.perf_counter()
        # over the steps' own time (data wait + step): evaluation and checkpoints do not count
        rate = w["samples"] / w["step_seconds"] if w["step_seconds"] else 0.0
        mean_step = w["step_seconds"] / max(w["steps"], 1)
        waited = w["data_seconds"] / w["step_seconds"] if w["step_seconds"] else 0.0
        mine = np.array([rate, mean_step, waited], dtype=np.float64).tobytes()
        every = [np.frombuffer(b, dtype=np.float64) for b in
                 self.world.allgather_bytes(mine, f"distft.metrics.{global_step}")]
        rates = [float(e[0]) for e in every]
        steps = [float(e[1]) for e in every]
        waits = [float(e[2]) for e in every]
        self.child(self.rate).set(rate)
        self.child(self.data_wait).set(waited)
        job_rate = sum(rates)
        record = {"step": global_step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_sec": job_rate,
                  "rank_samples_per_sec": rates, "rank_step_seconds": steps,
                  "data_wait_share": max(waits), "rank_data_wait_share": waits, "time": time.time(),
                  **({"heads": heads} if heads is not None else {})}
        if self.world.rank == 0:
            self.child(self.job_rate).set(job_rate)
            slowest = int(np.argmax(steps))
            self.child(self.slowest).set(steps[slowest])
            self.child(self.slowest_rank).set(slowest)
            if self.forward:
                self.child(self.vs_forward).set(job_rate / self.world.size / self.forward)
            self.history.append(record)
            if self._jsonl:
                self._jsonl.write(json.dumps(record) + "\n")
            if self._progress:
                left = (total_steps - global_step) * mean_step
                draw_progress(f"[distft] step {global_step}/{total_steps} epoch {epoch} loss {loss:.4f} "
                               f"{job_rate:.0f} samples/s data {max(waits):.0%} ETA {left:.0f}s ")
            self._warn_data_wait(waits, w["steps"])
        self._window = {"samples": 0, "start": now, "steps": 0, "step_seconds": 0.0, "data_seconds": 0.0}
        if self.cfg.pushgateway and self.cfg.push_every_steps and \
                global_step - self._last_push >= self.cfg.push_every_steps:
            self.push()
            self._last_push = global_step
        return record

    def _warn_data_wait(self, waits: list, steps: int) -> None:
        """Once per launch (rank 0): a rank waited for data more than DATA_WAIT_WARN of its step time."""
        worst = int(np.argmax(waits))
        if self._warned_data_wait or waits[worst] <= DATA_WAIT_WARN:
            return
        self._warned_data_wait = True
        warn(self.world, f"the loader holds training back: rank {worst} waited for data {waits[worst]:.0%} of its "
                         f"step time over the last {steps} steps (over {DATA_WAIT_WARN:.0%}); raise data.workers, "
                         "or turn train.cache_features on (data.augment: false)")

    def skipped(self, n: int) -> None:
        self.child(self.skipped_steps).inc(n)

    def bad(self, n: int) -> None:
        if n:
            self.child(self.bad_samples).inc(n)

    def evaluation(self, evals: dict, epoch: int, step: Optional[int] = None, head: Optional[str] = None) -> None:
        labels = {"head": head} if head is not None else {}
        self.child(self.val_top1, **labels).set(evals["val_top1"])
        if evals["val_top5"] is not None:  # None: 5 classes or fewer
            self.child(self.val_top5, **labels).set(evals["val_top5"])
        self.event("eval", epoch=epoch, step=step, **labels, **evals)

    def restarted(self, record: Optional[dict], at_step: int) -> None:
        """A relaunch by the supervisor (None: this launch is not one): one line saying why and where
        it resumed, its counts by reason (this job's, so far), and the event in log.jsonl
        (summary.json `restarts`)."""
        if not record:
            return
        log(self.world, f"restart {record.get('n')} ({record.get('reason')}): resumed at step {at_step} "
                        f"on {self.world.size} rank(s), hosts {record.get('hosts')}")
        for reason, n in (record.get("counts") or {}).items():
            self.child(self.restarts, reason=str(reason)).inc(int(n))
        self.event("restart", at_step=at_step, reason=record.get("reason"),
                   hosts=[h for h in str(record.get("hosts") or "").split(",") if h], world_size=self.world.size)

    def event(self, name: str, **fields) -> None:
        """A line of the run's log.jsonl (rank 0): what summary.json is built from, across launches."""
        if self._jsonl:
            self._jsonl.write(json.dumps({"event": name, **fields, "time": time.time()}) + "\n")
            self._jsonl.flush()

    def push(self) -> None:
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(self.cfg.pushgateway, job=self.job, registry=self.registry,
                            grouping_key={"rank": str(self.world.rank)}, timeout=10)
        except OSError as exc:  # a monitoring outage must not kill a training job
            end_progress_line()
            print(f"[distft] warning: rank {self.world.rank}: push to {self.cfg.pushgateway} failed: {exc}",
                  file=sys.stderr, flush=True)

    def finish(self, summary: dict) -> None:
        end_progress_line()
        if summary.get("samples_per_sec") and self.forward:
            self.child(self.vs_forward).set(summary["samples_per_sec"] / self.world.size / self.forward)
        if self.cfg.pushgateway:
            self.push()
        if self.world.rank == 0 and self.cfg.report and summary.get("history"):
            write_report(RunFolder(self.output).report, summary["history"], summary)
        if self._jsonl:
            self._jsonl.write(json.dumps({"event": "done", **{k: summary.get(k) for k in (
                "steps", "samples_per_sec", "val_top1", "world_size")}, "time": time.time()}) + "\n")
            self._jsonl.close()
        if self.server is not None and self.cfg.linger_seconds:
            time.sleep(self.cfg.linger_seconds)  # lets a scraper read the final figures

    def close(self) -> None:
        if self.server is not None:
            server, _thread = self.server
            server.shutdown()
            server.server_close()
            self.server = None


def forward_probe(runner, ctx, batch_size: int, image_size: int, batches: int) -> Optional[float]:
    """Forward-only samples/s of the whole network at this batch (inference mode, warm)."""
    import mxnet as mx

    if batches <= 0:
        return None
    x = mx.nd.random.uniform(shape=(batch_size, 3, image_size, image_size), ctx=ctx)
    runner(x).wait_to_read()  # warm-up: graph build, allocation
    start = time.perf_counter()
    for _ in range(batches):
        out = runner(x)
    out.wait_to_read()
    return batch_size * batches / (time.perf_counter() - start)


def write_report(path: str, history: list, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    evals = summary.get("val_history") or []
    heads = [h["name"] for h in summary.get("heads") or []]
    for head in heads or [None]:  # a grid: one curve per head
        if head is None:
            points = [(h["step"], h["loss"]) for h in history]
            val = [(e["epoch"], e["val_top1"]) for e in evals]  # numbered from 0, as the logs are
        else:
            points = [(h["step"], h["heads"][head]["loss"]) for h in history if head in h.get("heads", {})]
            val = [(e["epoch"], e["val_top1"]) for e in evals if e.get("head") == head]
        if points:
            ax[0, 0].plot(*zip(*points), label=head)
        if val:
            ax[0, 1].plot(*zip(*val), marker="o", label=head)
    ax[0, 0].set(title="training loss" + (" per head" if heads else ""), xlabel="step")
    ax[0, 1].set(title="validation top-1", xlabel="epoch", ylim=(0, 1))
    ax[0, 1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if heads:
        ax[0, 0].legend(fontsize=7, ncol=2)
        ax[0, 1].legend(fontsize=7, ncol=2)
    ax[1, 0].plot(steps, [h["samples_per_sec"] for h in history], label="job")
    ax[1, 0].set(title="samples/s", xlabel="step")
    # the world size may change between launches: each rank's line covers the steps it ran
    for r in range(max(len(h["rank_step_seconds"]) for h in history)):
        points = [(h["step"], h["rank_step_seconds"][r] * 1000) for h in history if r < len(h["rank_step_seconds"])]
        ax[1, 1].plot(*zip(*points), label=f"rank {r}")
    for seg in summary.get("segments", [])[1:]:  # where a relaunch resumed
        for a in ax.ravel()[[0, 2, 3]]:
            a.axvline(seg["start_step"], color="grey", linestyle=":", linewidth=1)
    ax[1, 1].set(title="mean step time per rank (ms)", xlabel="step")
    ax[1, 1].legend(fontsize=8)
    top1 = summary.get("val_top1")
    fig.suptitle(f"{summary.get('model')}: {summary.get('world_size')} rank(s), "
                 f"{summary.get('samples_per_sec', 0):.0f} samples/s"
                 + (f", val top-1 {top1:.3f}" if top1 is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
