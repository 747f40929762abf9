"""heads.grid: many heads trained from one frozen-prefix pass, each learning what a single run
with its overrides learns; a diverging head stopped alone; grid checkpoints resumed on another
world size; config errors and the memory refusal."""
import json
import os
import shutil
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest

from distft.config import load_config
from distft.errors import ConfigError
from distft.train.grid import grid_points, head_config

from conftest import horovodrun, load_params, read_summary, run_cli, small_config, write_config

GRID = {"optimizer.lr": [0.001, 0.0005], "train.label_smoothing": [0.0, 0.1]}
LAST_STAGE = ["features.8", "output"]  # resnet18_v2: 4 BatchNorms, synchronized by default


def max_diff(a_path, b_path, relative=False):
    """The largest difference over the tensors (with `relative`, each against its largest
    value, at least 1: running variances reach 1e5)."""
    a, b = load_params(a_path), load_params(b_path)
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[n] - b[n]))) / (max(1.0, float(np.max(np.abs(a[n])))) if relative else 1.0)
               for n in a)


# --- the grid as plain data ----------------------------------------------------------------------

def test_grid_points_are_named_in_order_with_the_last_key_fastest():
    points = grid_points({"optimizer.lr": [0.1, 0.01], "optimizer.weight_decay": [0.0, 1e-4, 1e-3]})
    assert [p.name for p in points] == [f"h{i}" for i in range(6)]
    assert points[1].overrides == {"optimizer.lr": 0.1, "optimizer.weight_decay": 1e-4}
    assert points[3].overrides == {"optimizer.lr": 0.01, "optimizer.weight_decay": 0.0}
    cfg = head_config(load_config(None, ["data.val_split=0.1"]), {"optimizer.lr_mult": {"features": 0.1},
                                                                   "optimizer.momentum": 0})
    assert cfg.optimizer.lr_mult == {"features": 0.1} and cfg.optimizer.momentum == 0.0


@pytest.mark.parametrize("grid, message", [
    ("{optimizer.name: [sgd, adam]}", "heads.grid.optimizer.name: not a key a head can vary (those are "
                                      "optimizer.lr, optimizer.weight_decay, optimizer.momentum, "
                                      "optimizer.lr_mult, train.label_smoothing)"),
    ("{optimizer.lr: 0.1}", "heads.grid.optimizer.lr: expected a non-empty list of values, got 0.1"),
    ("{optimizer.lr: [0.1, -1]}", "heads.grid.optimizer.lr[1]: must be >= 0.0, got -1.0"),
    ("{optimizer.lr_mult: [0.1]}", "heads.grid.optimizer.lr_mult[0]: expected a mapping, got 0.1"),
    ("{train.label_smoothing: [1.0]}", "heads.grid.train.label_smoothing[0]: a fraction below 1, got 1.0"),
])
def test_a_bad_grid_is_one_line_naming_its_key(grid, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"heads.grid={grid}", "data.val_split=0.1"])
    assert str(err.value) == message


def test_a_grid_without_validation_data_names_heads_select():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["heads.grid={optimizer.lr: [0.1, 0.01]}"])
    assert str(err.value).startswith("heads.select: a grid keeps the head that validates best; set data.val")


def test_a_grid_that_does_not_fit_in_memory_is_refused_naming_heads_grid(tmp_path, pretrained, monkeypatch):
    from distft.train import builders
    from distft.train import heads, memory
    from distft.models import gluon, network
    from distft.distributed.world import LocalWorld

    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(
        tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]}, data={"val_split": 0.2},
        heads={"grid": {"optimizer.lr": [0.1, 0.01, 0.001]}})))
    net = network.create(cfg.model, mx.cpu(), seed=0)
    spec = gluon.describe(net, cfg.model.name, cfg.model.head)
    prepared = builders.build_network(cfg, LocalWorld(), net, spec, 0, mx.cpu())
    est = memory.memory_estimate(cfg, prepared.plan, prepared.runner, 3, 8)
    one = memory.memory_estimate(cfg, prepared.plan, prepared.runner, 1, 8)
    t = prepared.plan.totals()
    assert est["gradients"] == 3 * t["trainable_bytes"] and est["optimizer_state"] == 3 * t["trainable_bytes"]
    assert est["activations"] == 3 * one["activations"] > 0
    monkeypatch.setattr(memory, "device_memory", lambda ctx, ranks=1: (est["total"] - 1, "host RAM available per rank"))
    with pytest.raises(ConfigError) as err:
        heads.build_heads(cfg, SimpleNamespace(local_size=1, rank=0), net, prepared, mx.cpu())
    assert str(err.value).startswith("heads.grid: 3 heads need about ")
    assert "than the " in str(err.value) and "use fewer points or a smaller data.batch_size" in str(err.value)


# --- two ranks: equal to single runs, a diverging head, resume on another world size ---------------

@pytest.mark.horovod
def test_two_rank_grid_heads_match_single_runs_a_diverging_head_stops_alone_and_resume_on_one_rank(
        tmp_path, pretrained):
    """In the default mode, with the last stage's BatchNorms trainable and synchronized: each head
    keeps its own statistics, and one exchange per layer carries every head's."""
    doc = small_config(tmp_path, pretrained, freeze={"trainable": LAST_STAGE},
                       data={"batch_size": 8, "val_split": 0.2},
                       optimizer={"name": "sgd", "lr": 0.001, "momentum": 0.9, "weight_decay": 1e-4},
                       train={"max_steps": 6, "checkpoint_every_steps": 3, "log_every": 2},
                       metrics={"port": 0, "report": True})
    single = write_config(tmp_path / "single.yaml", doc)
    grid = write_config(tmp_path / "grid.yaml", {**doc, "heads": {"grid": GRID}})
    # h1 (lr 0.001, smoothing 0.1): rank 1 sees its loss turn NaN at step 2
    proc = run_cli(["--config", grid], launcher=horovodrun(2, "mpi"), env={"DISTFT_FAULT_NONFINITE_LOSS": "1@2:h1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2 (epoch 0): head h1 (optimizer.lr=0.001, train.label_smoothing=0.1) diverged " \
           "(non-finite loss on rank(s) [1]); it is stopped, 3 head(s) go on" in proc.stdout + proc.stderr
    out = tmp_path / "out"
    s = read_summary(out)
    assert [h["name"] for h in s["heads"]] == ["h0", "h1", "h2", "h3"]
    assert s["heads"][2]["overrides"] == {"optimizer.lr": 0.0005, "train.label_smoothing": 0.0}
    assert s["heads"][1]["diverged"] == {"step": 2, "epoch": 0, "reason": "non-finite loss on rank(s) [1]"}
    assert all("diverged" not in h and h["val_top1"] is not None for h in s["heads"] if h["name"] != "h1")
    assert s["steps"] == 6 and s["best_head"] in ("h0", "h2", "h3")
    # one forward exchange per layer and step carries every head; backward, one per head (MXNet
    # runs the heads' backward passes one after another) and none for the first BN, whose input
    # (the frozen prefix's output) needs no gradient: 3 layers x (4 heads x 2 steps + 3 x 4)
    assert s["synchronized_bn_layers"] == 4 and s["bn_channel"] == "mpi"
    assert s["bn_exchanges"] == {"forward": 4 * 6, "backward": 3 * (4 * 2 + 3 * 4)}
    assert os.path.isfile(out / "report.png")
    with open(out / "log.jsonl") as fh:
        evals = [r for r in map(json.loads, fh) if r.get("event") == "eval"]
    assert sorted(e["head"] for e in evals) == ["h0", "h2", "h3"]
    assert max_diff(out / "model.params", out / "heads" / s["best_head"] / "model.params") == 0.0
    # two grid points against single 2-rank runs with those overrides
    for name in ("h2", "h3"):
        sets = [f"--set={k}={v}" for k, v in s["heads"][int(name[1])]["overrides"].items()]
        alone = tmp_path / f"alone-{name}"
        proc = run_cli(["--config", single, *sets, f"--set=train.output={alone}"], launcher=horovodrun(2, "mpi"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert max_diff(out / "heads" / name / "model.params", alone / "model.params") <= 1e-5
    # the checkpoint of step 3 (all four heads, h1 stopped) resumed on one rank ends where 2 ranks ended
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "ckpt-00000003", resumed / "checkpoints" / "ckpt-00000003")
    # (one micro-batch of 16: a local BN over the union batch, as the two ranks' synchronized ones)
    proc = run_cli(["--config", grid, f"--set=train.output={resumed}", "--set=data.batch_size=16"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = read_summary(resumed)
    assert r["resumed"] and r["steps_this_run"] == 3 and r["heads"][1]["diverged"]["step"] == 2
    for name in ("h0", "h2", "h3"):
        assert max_diff(out / "heads" / name / "model.params", resumed / "heads" / name / "model.params",
                        relative=True) <= 1e-5


def test_model_params_is_written_as_save_parameters_writes_it_without_a_copy_of_every_tensor(tmp_path):
    """model.params has save_parameters' keys and values, written from the arrays themselves:
    save_parameters copies every tensor first, and for resnet50_v2 that was the run's peak
    memory (+85 MiB as training ends). Peak RSS is reset (clear_refs) before the write."""
    import subprocess
    import sys

    code = f"""
import mxnet as mx
from types import SimpleNamespace
from mxnet.gluon import nn
from distft.runfolder import RunFolder
from distft.train.heads import HeadSet
net = nn.HybridSequential()
for _ in range(4):
    net.add(nn.Dense(2048, in_units=2048))  # 4 x 16 MiB
net.initialize()
net.save_parameters({str(tmp_path / 'reference.params')!r})
heads = SimpleNamespace(grid=False, heads=[SimpleNamespace(all_params={{}})])
heads.network_arrays = lambda n, h: HeadSet.network_arrays(heads, n, h)
(write,) = HeadSet.model_files(heads, RunFolder({str(tmp_path)!r}), net).values()
mx.nd.waitall()
status = lambda key: int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) // 1024
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS')
write({str(tmp_path / 'model.params')!r})
print(status('VmHWM') - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew_mib = int(out.stdout.strip().splitlines()[-1])
    assert grew_mib < 32, f"writing 64 MiB of parameters took {grew_mib} MiB more memory"
    ours, reference = load_params(tmp_path / "model.params"), load_params(tmp_path / "reference.params")
    assert sorted(ours) == sorted(reference) and len(ours) == 8
    assert all(np.array_equal(ours[k], reference[k]) for k in ours)


def test_model_params_records_the_cpu_whatever_device_trained(tmp_path):
    """A file records each array's device, and one that names gpu(0) loads onto a GPU wherever
    one is: arrays not on the CPU are copied there first, and the file is byte for byte what
    save_parameters writes. A second CPU device stands in for a GPU here (its id is recorded
    too)."""
    from mxnet.gluon import nn

    from distft.runfolder import RunFolder
    from distft.train.heads import HeadSet

    net = nn.Dense(3, in_units=2)
    net.initialize(ctx=mx.cpu(1))
    net.save_parameters(str(tmp_path / "reference.params"))
    heads = SimpleNamespace(grid=False, heads=[SimpleNamespace(all_params={})])
    heads.network_arrays = lambda n, h: HeadSet.network_arrays(heads, n, h)
    (write,) = HeadSet.model_files(heads, RunFolder(str(tmp_path)), net).values()
    write(str(tmp_path / "model.params"))
    assert (tmp_path / "model.params").read_bytes() == (tmp_path / "reference.params").read_bytes()
