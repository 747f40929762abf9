"""The feature cache changes speed, not results; the benchmark command reports every figure."""
import json
import os

import numpy as np
import pytest

from distft.config import load_config
from distft.distributed.world import LocalWorld
from distft.errors import DistftError
from distft.train.run import run

from conftest import load_params, run_cli, small_config, write_config


def train(tmp_path, pretrained, name, trainable=("features.8", "output"), lr=0.01, **train_section):
    # fixed shards in both runs: what the cached run gets from data.shards: auto
    doc = small_config(tmp_path, pretrained, freeze={"trainable": list(trainable)},
                       data={"batch_size": 32, "shards": "fixed"}, optimizer={"lr": lr},
                       train={"epochs": 3, "max_steps": None, "output": str(tmp_path / name), **train_section})
    return run(load_config(write_config(tmp_path / f"{name}.yaml", doc)), LocalWorld())


def max_diff(tmp_path, a, b):
    a, b = load_params(tmp_path / a / "model.params"), load_params(tmp_path / b / "model.params")
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in a)


def test_cached_features_are_exactly_the_computed_ones(tmp_path, pretrained):
    """Imperative runs (the same kernels either way): the cache changes nothing, bit for bit."""
    train(tmp_path, pretrained, "plain", hybridize=False)
    s = train(tmp_path, pretrained, "cached", hybridize=False, cache_features=True)
    assert max_diff(tmp_path, "plain", "cached") == 0.0
    cache = s["feature_cache"]
    # epoch 0 computes every sample of the shard, epochs 1 and 2 read them all from the cache
    assert cache["misses"] == s["steps"] // 3 * 32 and cache["hits"] == 2 * cache["misses"]


def test_cached_and_uncached_runs_give_the_same_weights(tmp_path, pretrained):
    """Hybridized, as jobs run: the suffix then reads a plain array instead of the prefix's
    oneDNN-layout output, so kernels round differently, but the weights agree to 1e-5."""
    train(tmp_path, pretrained, "plain", trainable=("output",), lr=0.001)
    train(tmp_path, pretrained, "cached", trainable=("output",), lr=0.001, cache_features=True)
    assert max_diff(tmp_path, "plain", "cached") <= 1e-5


def test_cache_spills_to_a_file_past_the_memory_limit_in_float16(tmp_path, pretrained):
    s = train(tmp_path, pretrained, "spilled", trainable=("output",), lr=0.001, cache_features=True,
              cache_memory_bytes=1024, cache_dtype="float16")
    assert s["feature_cache"]["file"].endswith("features-rank0.float16") and s["feature_cache"]["hits"] > 0
    assert not os.path.exists(s["feature_cache"]["file"])  # removed at the end


def test_float16_cache_keeps_features_to_float16_precision(tmp_path):
    from distft.components.cache import FeatureCache

    rng = np.random.default_rng(0)
    feats = rng.normal(0, 50, (6, 512, 1, 1)).astype(np.float32)
    cache = FeatureCache(np.arange(10), "float16", memory_bytes=0, directory=str(tmp_path), rank=0)
    cache.put(np.array([1, 3, 5, 7, 8, 9]), feats)
    assert cache.path and cache.has_all(np.array([3, 9])) and not cache.has_all(np.array([0, 3]))
    with pytest.raises(IndexError, match="outside this rank's shard"):
        cache.has_all(np.array([10]))
    back = cache.get(np.array([1, 3, 5, 7, 8, 9]))
    assert back.dtype == np.float32
    assert np.max(np.abs(back - feats) / np.maximum(np.abs(feats), 1e-3)) <= 2 ** -11  # float16's rounding
    cache.close()
    assert not os.path.exists(cache.path)


def test_cache_with_augmentation_or_reshuffled_shards_is_a_config_error(tmp_path, pretrained):
    doc = small_config(tmp_path, pretrained, data={"augment": True}, train={"cache_features": True})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 2 and "train.cache_features: needs data.augment: false" in proc.stderr
    doc = small_config(tmp_path, pretrained, data={"shards": "reshuffled"}, train={"cache_features": True})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 2 and "data.shards: `reshuffled` hands every rank new samples" in proc.stderr


@pytest.mark.horovod
def test_on_two_ranks_every_batch_after_the_first_epoch_comes_from_the_cache(tmp_path, pretrained):
    """With fixed shards (what data.shards: auto picks for the cache) each rank sees the same
    samples every epoch, so nothing is computed twice."""
    from conftest import horovodrun, read_summary

    B = 16
    doc = small_config(tmp_path, pretrained, data={"batch_size": B},
                       train={"epochs": 3, "max_steps": None, "cache_features": True, "log_every": 10})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = read_summary(tmp_path / "out")
    spe = s["steps"] // 3
    cache = s["feature_cache"]
    assert cache["hits"] + cache["misses"] == s["steps"] * B
    # epoch 0 computes each sample of the rank's shard once; later epochs only read
    assert cache["misses"] == spe * B and cache["hits"] == 2 * spe * B


@pytest.mark.horovod
def test_bench_command_reports_every_field(tmp_path, pretrained):
    doc = small_config(tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]}, data={"batch_size": 8})
    out = tmp_path / "bench.json"
    proc = run_cli(["bench", "--config", write_config(tmp_path / "c.yaml", doc), "--np", "2", "--steps", "15",
                    "--window", "5", "--cache-epochs", "2", "--repeats", "2", "--json", str(out), "--markdown", str(tmp_path / "bench.md")], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    for group, keys in {"samples_per_sec": ("distft", "baseline", "limit"),
                        "ratios": ("distft_over_baseline", "distft_over_limit"),
                        "peak_rss_bytes": ("distft", "baseline"), "bytes_broadcast": ("distft", "baseline")}.items():
        for key in keys:
            assert r[group][key] > 0, (group, key)
    assert r["machine"]["cores"] >= 1 and r["machine"]["mxnet"] == "1.9.1"
    assert r["ratios"]["distft_over_limit"] == pytest.approx(r["samples_per_sec"]["distft"] / r["samples_per_sec"]["limit"])
    assert r["bytes_broadcast"]["distft"] < r["bytes_broadcast"]["baseline"]
    # two interleaved rounds; each figure is the median of its rounds
    assert all(len(v) == 2 for v in r["rounds"].values()) and set(r["rounds"]) == {"distft", "baseline", "limit"}
    assert r["samples_per_sec"]["baseline"] == pytest.approx(sum(r["rounds"]["baseline"]) / 2)
    # the cached run: epochs after the first, against the baseline
    assert len(r["cache"]["epoch_samples_per_sec"]) == 2
    assert r["ratios"]["cached_over_baseline"] == pytest.approx(
        r["samples_per_sec"]["distft_cached"] / r["samples_per_sec"]["baseline"])
    # the controller horovodrun picks itself (MPI: Horovod here has it), said in the output
    assert r["controller"] == "mpi" and "controller: horovodrun --mpi (horovodrun's own choice)" in proc.stdout
    # Horovod's cycle in each run, said beside the figures: distft's own 5 ms (statistics on MPI)
    assert r["horovod_cycle_ms"]["distft"] == 5.0
    assert r["mpi_yield_when_idle"]["distft"] == "1"
    assert r["mxnet_cpu_temp_copy"]["distft"] == "1"
    assert r["ratios"]["peak_rss_distft_over_baseline"] == pytest.approx(
        r["peak_rss_bytes"]["distft"] / r["peak_rss_bytes"]["baseline"])
    # the default mode synchronizes the trainable stage's BatchNorms over the MPI channel: both
    # channels' latency side by side, exchanges as counted in training (none backward for the
    # first BN after the frozen prefix), the floor
    sync = r["sync_bn"]
    assert sync["channel"] == "mpi" and set(sync["exchange_us"]) == {"mpi", "horovod"}
    assert sync["exchanges_per_step"] == {"forward": sync["layers"], "backward": sync["layers"] - 1}
    assert all(set(v) == {"local", "mpi", "horovod"} for v in sync["layer_us"].values())
    assert sync["bound_distft_over_baseline"] == pytest.approx(1 / (1 + sync["floor_fraction_of_baseline_step"]))
    assert "in_training" not in sync  # MPI exchanges are not in Horovod's timeline
    table = (tmp_path / "bench.md").read_text()
    assert "| samples/s (all ranks) |" in table and "with the feature cache" in table
    assert "| peak RSS vs the baseline's |" in table and "statistics over mpi" in table
    assert "(Horovod's cycle: distft 5 ms, baseline " in table and "OMPI_MCA_mpi_yield_when_idle: distft 1, " in table
    assert "| MXNet's CPU workspaces (MXNET_CPU_TEMP_COPY) | 1 | " in table


def _timeline(steps: int, step_us: int = 1000) -> list:
    """A Horovod timeline as rank 0 writes it: per step one synchronized BN layer (forward
    exchange negotiating 100 us, moving 50; backward 30 and 20) and two gradient buckets of two
    tensors each, fused into one operation of about 300 us whose tensors start a few us apart,
    bucket 1's before bucket 0's; then a lone bucket 2 of 100 us."""
    names = ["distft.syncbn.features.8.0.bn1.stats", "distft.syncbn.features.8.0.bn1.grad",
             "distft.grad.1_1of2", "distft.grad.1_2of2", "distft.grad.0_1of2", "distft.grad.0_2of2",
             "distft.grad.2"]
    events = [{"name": "process_name", "ph": "M", "pid": i, "args": {"name": f"horovod_allreduce.{n}"}}
              for i, n in enumerate(names)]

    def span(pid, phase, start, stop):
        events.extend([{"ph": "B", "name": phase, "ts": start, "pid": pid},
                       {"ph": "B", "name": "GLOO_ALLREDUCE", "ts": start + 1, "pid": pid},  # nested: not counted
                       {"ph": "E", "ts": stop - 1, "pid": pid}, {"ph": "E", "ts": stop, "pid": pid}])

    for k in range(steps):
        t = k * step_us + 10
        span(0, "NEGOTIATE_ALLREDUCE", t, t + 100)
        span(0, "ALLREDUCE", t + 100, t + 150)
        span(1, "NEGOTIATE_ALLREDUCE", t + 200, t + 230)
        span(1, "ALLREDUCE", t + 230, t + 250)
        for pid in (2, 3, 4, 5):
            span(pid, "NEGOTIATE_ALLREDUCE", t + 300 + pid, t + 400)
            span(pid, "ALLREDUCE", t + 396 + pid, t + 700 + pid)  # bucket 1 starts first
        span(6, "NEGOTIATE_ALLREDUCE", t + 720, t + 750)
        span(6, "ALLREDUCE", t + 750, t + 850)
    return events


def test_timeline_summary_counts_each_operation_once_per_step(tmp_path):
    from distft.bench import timeline

    events = _timeline(12)
    s = timeline.summarise(events, skip=3)
    assert s["steps"] == 8 and s["step_ms"] == pytest.approx(1.0)  # between the 4th and the last bucket 0
    fwd, bwd, grads = (s["groups"][g] for g in ("bn_forward", "bn_backward", "gradients"))
    assert (fwd["per_step"], fwd["negotiate_ms_per_step"], fwd["transfer_ms_per_step"]) == pytest.approx((1, 0.1, 0.05))
    assert (bwd["per_step"], bwd["transfer_median_ms"]) == pytest.approx((1, 0.02))
    # four tensors, two buckets, one fused operation of 398 to 705 us (counted in the step of
    # bucket 0's, though bucket 1's tensors started first), then bucket 2 alone: 2 operations
    assert grads["per_step"] == 2
    assert grads["transfer_ms_per_step"] == pytest.approx(0.307 + 0.1)
    assert grads["transfer_median_ms"] == pytest.approx((0.307 + 0.1) / 2)
    assert grads["negotiate_ms_per_step"] == pytest.approx(0.098 + 0.03)  # 302..400 (the union), 720..750
    # two operations back to back, one ending on the microsecond the next starts, stay two
    assert len(timeline._merged([(0, 100, True), (100, 200, False)])) == 2
    with pytest.raises(ValueError, match="holds 4 steps"):
        timeline.summarise(_timeline(4), skip=3)
    # Horovod closes the array only at shutdown; a killed rank leaves half an event
    text = json.dumps(events)
    cut = tmp_path / "cut.json"
    cut.write_text(text[:-1] + ",\n" + text[1:len(text) // 2])
    assert len(timeline.load(str(cut))) > len(events)
    (tmp_path / "bad.json").write_text("not a timeline")
    with pytest.raises(ValueError, match="bad.json"):
        timeline.load(str(tmp_path / "bad.json"))


def test_bench_keeps_its_figures_when_the_traced_run_fails_and_traces_only_that_run(tmp_path, monkeypatch, pretrained):
    import sys

    from distft.bench import bench, tables

    doc = small_config(tmp_path, pretrained)
    config = write_config(tmp_path / "c.yaml", doc)
    failing = [sys.executable, "-c", "import sys; print('rank 1 exited'); sys.exit(3)"]
    traced = bench._traced(config, [], 15, 5, str(tmp_path), failing, 60)
    assert traced == {"error": "bench: the distft (timeline) run failed (exit 3): rank 1 exited"}
    assert "not measured: bench: the distft (timeline) run failed" in tables._timeline_lines(traced)
    # a timeline the user set for their own jobs does not reach (and slow) the timed runs
    monkeypatch.setenv("HOROVOD_TIMELINE", str(tmp_path / "mine.json"))
    check = [sys.executable, "-c", "import os, sys; sys.exit('HOROVOD_TIMELINE' in os.environ)"]
    bench._run(check, "timed", 60)
    with pytest.raises(DistftError, match="traced"):
        bench._run(check, "traced", 60, env={"HOROVOD_TIMELINE": str(tmp_path / "t.json")})
