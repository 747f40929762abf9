"""Gradual unfreezing and per-block learning rates, on 2 real ranks."""
import json
import shutil

import numpy as np
import pytest

from distft import cli

from conftest import horovodrun, load_params, read_summary, run_cli, small_config, write_config

pytestmark = pytest.mark.horovod
SCHEDULE = [{"epoch": 1, "unfreeze": ["features.8"]}]


def job(tmp_path, pretrained, name, epochs, **train):
    doc = small_config(tmp_path, pretrained, freeze={"trainable": ["output"], "schedule": SCHEDULE},
                       data={"batch_size": 32},
                       optimizer={"name": "sgd", "lr": 0.05, "lr_mult": {"features": 0.1}},
                       train={"epochs": epochs, "max_steps": None, "output": str(tmp_path / name), **train})
    return write_config(tmp_path / f"{name}.yaml", doc)


def run2(cfg, *extra):
    proc = run_cli(["--config", cfg, *extra], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory, pretrained):
    tmp = tmp_path_factory.mktemp("unfreeze")
    run2(job(tmp, pretrained, "full", 2, checkpoint_every_steps=4, keep_checkpoints=20))
    return tmp


def test_block_is_bitwise_frozen_before_its_epoch_and_trains_after(tmp_path, pretrained, scheduled_run):
    run2(job(tmp_path, pretrained, "first-epoch", 2, max_steps=11))  # epoch 0 alone (11 steps)
    before = load_params(pretrained)
    first = load_params(tmp_path / "first-epoch" / "model.params")
    both = load_params(scheduled_run / "full" / "model.params")
    block = [n for n in before if n.startswith("features.8.")]
    assert all(np.array_equal(first[n], before[n]) for n in block)  # BN statistics included
    assert all(not np.array_equal(both[n], before[n]) for n in block if n.endswith(("weight", "running_mean")))
    assert all(np.array_equal(both[n], before[n]) for n in before if n.startswith("features.7."))


def test_ranks_agree_after_the_switch_and_lr_multipliers_are_in_the_optimizer(scheduled_run):
    s = read_summary(scheduled_run / "full")
    (switch,) = s["freeze_switches"]
    assert switch["epoch"] == 1 and switch["step"] == s["steps"] // 2
    assert len(switch["rank_state_digests"]) == 2 and len(set(switch["rank_state_digests"])) == 1
    assert "features.8.0.conv1.weight" in switch["unfrozen"] and not switch["refrozen"]
    assert s["rank_state_digests"][0] == s["rank_state_digests"][1]
    mults = s["lr_mult"]
    assert mults["features.8.0.conv1.weight"] == pytest.approx(0.1)
    assert mults["output.weight"] == 1.0
    assert all(v == pytest.approx(0.1) for n, v in mults.items() if n.startswith("features."))


@pytest.mark.parametrize("step", [11, 16])  # the epoch-0 end (before the switch) and after it
def test_resume_on_either_side_of_the_switch_ends_with_the_same_weights(tmp_path, pretrained, scheduled_run, step):
    out = tmp_path / "resumed"
    shutil.copytree(scheduled_run / "full" / "checkpoints" / f"ckpt-{step:08d}",
                    out / "checkpoints" / f"ckpt-{step:08d}")
    run2(job(tmp_path, pretrained, "resumed", 2))
    s = read_summary(out)
    assert s["resumed"] and s["steps_this_run"] == s["steps"] - step
    a, b = load_params(scheduled_run / "full" / "model.params"), load_params(out / "model.params")
    assert max(float(np.max(np.abs(a[n] - b[n]))) for n in a) <= 1e-6


def test_plan_shows_the_schedule(tmp_path, capsys, pretrained):
    cfg = job(tmp_path, pretrained, "plan", 2)
    assert cli.main(["plan", "--config", cfg, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (stage,) = doc["schedule"]
    assert stage["epoch"] == 1 and "features.8.0.conv1.weight" in stage["newly_trainable"]
    assert stage["trainable_params"] > doc["trainable_params"]


def test_plan_memory_covers_the_largest_stage_of_the_schedule(tmp_path, capsys, pretrained):
    """The schedule's second stage trains features.8 too: the estimate is that stage's, and says so."""
    cfg = job(tmp_path, pretrained, "plan", 2)
    assert cli.main(["plan", "--config", cfg, "--json"]) == 0
    staged = json.loads(capsys.readouterr().out)["memory"]
    assert cli.main(["plan", "--config", cfg, "--json", "--set", "freeze.schedule=[]"]) == 0
    first = json.loads(capsys.readouterr().out)["memory"]
    assert staged["stage"] == "freeze.schedule[0] (epoch 1)" and first["stage"] == "freeze.trainable"
    assert staged["total"] > first["total"] and staged["gradients"] > first["gradients"]
    assert staged["weights"] == first["weights"]  # the same network
    assert cli.main(["plan", "--config", cfg]) == 0
    text = capsys.readouterr().out
    assert "memory per rank (estimate, micro-batch 32, the largest stage: freeze.schedule[0] (epoch 1))" in text


def test_lr_mult_with_an_unknown_block_names_the_key(tmp_path, capsys, pretrained):
    doc = small_config(tmp_path, pretrained, optimizer={"lr_mult": {"features.99": 0.1}})
    assert cli.main(["--config", write_config(tmp_path / "c.yaml", doc)]) == 2
    assert "optimizer.lr_mult['features.99']: no block named 'features.99'" in capsys.readouterr().err
