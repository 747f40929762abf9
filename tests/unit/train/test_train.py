"""Single-process training: frozen means frozen, checkpoints round-trip, resume is exact."""
import json
import os
import re
import shutil

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

from distft.components import checkpoint
from distft.config import load_config
from distft.distributed.world import LocalWorld
from distft.train.run import run

from conftest import load_params, read_summary, run_cli, small_config, write_config


def train(tmp_path, pretrained, name="cfg.yaml", overrides=(), **sections):
    path = write_config(tmp_path / name, small_config(tmp_path, pretrained, **sections))
    return run(load_config(path, list(overrides)), LocalWorld())


def frozen_and_trainable(out_dir, pretrained, trainable_prefixes):
    before, after = load_params(pretrained), load_params(os.path.join(out_dir, "model.params"))
    frozen = [n for n in after if not n.startswith(trainable_prefixes)]
    trainable = [n for n in after if n.startswith(trainable_prefixes)]
    return before, after, frozen, trainable


@pytest.mark.parametrize("hybridize", [True, False])
def test_frozen_weights_and_bn_statistics_stay_bitwise(tmp_path, pretrained, hybridize):
    """features.7 is frozen between trainable features.6 and features.8: backward runs
    through its BatchNorms every step, and they must not move."""
    trainable = ("features.6.", "features.8.", "output.")
    train(tmp_path, pretrained, freeze={"trainable": ["features.6", "features.8", "output"]},
          train={"hybridize": hybridize, "max_steps": 4})
    before, after, frozen, trained = frozen_and_trainable(tmp_path / "out", pretrained, trainable)
    assert any(n.startswith("features.7.") and n.endswith("running_mean") for n in frozen)
    moved = [n for n in frozen if not np.array_equal(before[n], after[n])]
    assert moved == []
    # the trainable blocks did train, BN statistics included
    assert not np.array_equal(before["features.8.0.conv1.weight"], after["features.8.0.conv1.weight"])
    assert not np.array_equal(before["features.6.0.bn1.running_mean"], after["features.6.0.bn1.running_mean"])


def test_hybridized_training_matches_imperative_with_a_trainable_batchnorm(tmp_path, pretrained):
    """Guards the oneDNN cached-graph BatchNorm bug (wrong from the third step on): a
    hybridized run with trainable BN layers must learn what the imperative run learns."""
    runs = {}
    for hybridize in (True, False):
        out = tmp_path / f"h{int(hybridize)}"
        train(tmp_path, pretrained, name=f"h{int(hybridize)}.yaml", freeze={"trainable": ["features.8", "output"]},
              data={"batch_size": 16}, optimizer={"weight_decay": 1e-4},
              train={"hybridize": hybridize, "max_steps": 5, "output": str(out)})
        runs[hybridize] = load_params(out / "model.params")
    before = load_params(pretrained)
    for n, w in runs[False].items():
        update = np.max(np.abs(w - before[n]))
        assert np.max(np.abs(runs[True][n] - w)) <= 1e-4 * max(update, 1e-3), n


def test_plain_grad_req_null_does_move_bn_statistics():
    """The MXNet behaviour distft guards against: grad_req='null' on a BatchNorm between
    trainable layers does not stop its running statistics from drifting."""
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=3), nn.BatchNorm(in_channels=4), nn.Conv2D(2, 1, in_channels=4))
    net.initialize()
    net[1].collect_params().setattr("grad_req", "null")
    before = net[1].running_mean.data().asnumpy().copy()
    with autograd.record():
        y = net(mx.nd.random.normal(shape=(4, 3, 8, 8)))
    y.backward()
    assert not np.array_equal(before, net[1].running_mean.data().asnumpy())


def test_batch_policy_reestimates_frozen_bn_statistics(tmp_path, pretrained):
    train(tmp_path, pretrained, freeze={"trainable": ["output"], "batchnorm": "batch"})
    before, after, frozen, _ = frozen_and_trainable(tmp_path / "out", pretrained, ("output.",))
    stats = [n for n in frozen if n.endswith("running_mean")]
    weights = [n for n in frozen if not n.endswith(("running_mean", "running_var"))]
    assert all(not np.array_equal(before[n], after[n]) for n in stats)  # features.0 included
    assert all(np.array_equal(before[n], after[n]) for n in weights)


def test_summary_and_model_params(tmp_path, pretrained):
    train(tmp_path, pretrained, data={"val": "demo"}, freeze={"trainable": ["features.8", "output"]})
    s = read_summary(tmp_path / "out")
    for key in ("epochs", "steps", "samples_per_sec", "val_top1", "trainable_params", "frozen_params"):
        assert key in s, key
    assert s["steps"] == 3 and s["samples_per_sec"] > 0 and 0 <= s["val_top1"] <= 1
    assert s["data_wait_share"] == pytest.approx(s["data_wait_seconds"] / (s["data_wait_seconds"] + s["compute_seconds"]))
    assert s["trainable_params"] + s["frozen_params"] == sum(v.size for v in load_params(pretrained).values())
    net = mx.gluon.model_zoo.vision.get_model("resnet18_v2", classes=5)
    net.load_parameters(str(tmp_path / "out" / "model.params"))  # loads as is, no allow_missing
    assert net(mx.nd.zeros((2, 3, 32, 32))).shape == (2, 5)


def test_checkpoint_holds_only_trainable_state(tmp_path, pretrained):
    train(tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]})
    (ckpt_path,) = checkpoint.list_checkpoints(str(tmp_path / "out"))
    ckpt = checkpoint.load(ckpt_path)
    assert all(n.startswith(("features.8.", "output.")) for n in ckpt.params)
    assert "features.8.0.bn1.running_mean" in ckpt.params
    assert set(ckpt.optimizer) == {f"{n}#0" for n in ckpt.params if not n.endswith(("running_mean", "running_var"))}
    assert os.path.getsize(os.path.join(ckpt_path, "trainable.params")) < 0.9 * os.path.getsize(pretrained)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_ends_with_the_same_weights(tmp_path, pretrained, optimizer):
    """A run interrupted after a mid-epoch checkpoint and resumed ends where an uninterrupted
    run ends: same data position, learning rate, optimizer state (momentum, Adam's counts)."""
    sections = dict(freeze={"trainable": ["features.8", "output"]},
                    data={"train": "demo", "val": None, "batch_size": 64, "workers": 0, "augment": True},
                    optimizer={"name": optimizer, "lr": 0.01, "schedule": "cosine", "warmup_steps": 2},
                    train={"epochs": 2, "max_steps": None, "checkpoint_every_steps": 5, "keep_checkpoints": 10})
    train(tmp_path, pretrained, **sections)
    full = read_summary(tmp_path / "out")
    assert full["steps"] == 22
    for step in (5, 15):  # inside epoch 0 and inside epoch 1
        resumed_out = tmp_path / f"resumed-{step}"
        shutil.copytree(tmp_path / "out" / "checkpoints" / f"ckpt-{step:08d}",
                        resumed_out / "checkpoints" / f"ckpt-{step:08d}")
        train(tmp_path, pretrained, name=f"r{step}.yaml", overrides=[f"train.output={resumed_out}"], **sections)
        resumed = read_summary(resumed_out)
        assert resumed["resumed"] and resumed["steps"] == 22 and resumed["steps_this_run"] == 22 - step
        a, b = load_params(tmp_path / "out" / "model.params"), load_params(resumed_out / "model.params")
        worst = max(float(np.max(np.abs(a[n] - b[n]))) for n in a)
        assert worst <= 1e-6, (step, worst)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, pretrained, capsys):
    train(tmp_path, pretrained, train={"max_steps": 4, "checkpoint_every_steps": 2})
    paths = checkpoint.list_checkpoints(str(tmp_path / "out"))
    assert [os.path.basename(p) for p in paths] == ["ckpt-00000002", "ckpt-00000004"]
    with open(os.path.join(paths[-1], "trainable.params"), "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xff\xff\xff")
    with pytest.raises(Exception, match="checksum mismatch"):
        checkpoint.load(paths[-1])
    warnings = []
    ckpt = checkpoint.latest(str(tmp_path / "out"), warn=warnings.append)
    assert ckpt.path == paths[0] and "checksum mismatch" in warnings[0]


def test_keep_last_k_checkpoints(tmp_path, pretrained):
    train(tmp_path, pretrained, train={"max_steps": 6, "checkpoint_every_steps": 1, "keep_checkpoints": 2})
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path / "out"))]
    assert names == ["ckpt-00000005", "ckpt-00000006"]
    assert not [n for n in os.listdir(tmp_path / "out" / "checkpoints") if n.startswith(".tmp")]


def test_relaunch_with_another_freeze_plan_is_refused_naming_the_key(tmp_path, pretrained):
    train(tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]})
    proc = run_cli(["--config", write_config(tmp_path / "other.yaml", small_config(
        tmp_path, pretrained, freeze={"trainable": ["features.7", "output"]}, train={"max_steps": 5}))])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "distft: error: freeze.trainable: this job's checkpoints were written with freeze.trainable: "
        "[features.8, output]; this launch asks for [features.7, output]; a resumed job keeps it (use another train.output, "
        "or train.resume: false to start over)")


def test_relaunch_that_only_grows_the_run_or_changes_the_micro_batch_is_accepted(tmp_path, pretrained):
    train(tmp_path, pretrained, train={"max_steps": 2})
    s = train(tmp_path, pretrained, overrides=["train.max_steps=4", "data.batch_size=4", "data.workers=1"])
    assert s["resumed"] and s["steps"] == 4 and s["global_batch"] == 8 and s["accumulation"] == 2


def test_first_format_checkpoint_still_resumes_exactly(tmp_path, pretrained):
    """Checkpoints written before the train state was counted in samples (format 1) load."""
    sections = dict(freeze={"trainable": ["features.8", "output"]}, optimizer={"name": "adam", "lr": 0.001},
                    train={"max_steps": 6, "checkpoint_every_steps": 3, "keep_checkpoints": 5})
    train(tmp_path, pretrained, **sections)
    old = tmp_path / "old" / "checkpoints" / "ckpt-00000003"
    shutil.copytree(tmp_path / "out" / "checkpoints" / "ckpt-00000003", old)
    meta = json.loads((old / "meta.json").read_text())
    first = {"format": 1, "step": 3, "epoch": 0, "step_in_epoch": 3, "world_size": 1, "plan_epoch": 0,
             "model": meta["model"], "classes": meta["classes"], "lr": meta["lr"],
             "update_counts": meta["update_counts"], "state_digest": meta["state_digest"], "files": meta["files"]}
    (old / "meta.json").write_text(json.dumps(first))
    s = train(tmp_path, pretrained, name="old.yaml", overrides=[f"train.output={tmp_path / 'old'}"], **sections)
    assert s["resumed"] and s["steps_this_run"] == 3
    a, b = load_params(tmp_path / "out" / "model.params"), load_params(tmp_path / "old" / "model.params")
    assert max(float(np.max(np.abs(a[n] - b[n]))) for n in a) <= 1e-6


def test_first_format_checkpoint_of_another_plan_is_a_clear_error(tmp_path, pretrained):
    train(tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]})
    (ckpt,) = checkpoint.list_checkpoints(str(tmp_path / "out"))
    meta = json.loads(open(os.path.join(ckpt, "meta.json")).read())
    for key in ("job", "state"):
        meta.pop(key)
    meta.update(format=1, step_in_epoch=3)
    open(os.path.join(ckpt, "meta.json"), "w").write(json.dumps(meta))
    proc = run_cli(["--config", write_config(tmp_path / "other.yaml", small_config(
        tmp_path, pretrained, freeze={"trainable": ["features.7", "output"]}, train={"max_steps": 5}))])
    assert proc.returncode == 2
    assert "does not belong to this model/freeze plan" in proc.stderr and "missing: features.7" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_relaunching_a_finished_job_changes_nothing(tmp_path, pretrained):
    train(tmp_path, pretrained, train={"max_steps": 3})
    out = tmp_path / "out"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    proc = run_cli(["--config", str(tmp_path / "cfg.yaml")])
    assert proc.returncode == 0, proc.stderr
    assert "the job is complete (step 3 of 3); nothing to do" in proc.stdout
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    assert after == before


def test_demo_reaches_accuracy_far_above_chance(tmp_path):
    """The README's demo, end to end: pretrain on digits 0-4, fine-tune a head on 5-9."""
    target = tmp_path / "pretrained.params"
    pre_cfg = tmp_path / "demo-pretrain.yaml"
    doc = load_config("configs/demo-pretrain.yaml").to_dict()
    doc["train"]["output"] = str(tmp_path / "pre")
    write_config(pre_cfg, doc)
    demo = load_config("configs/demo.yaml").to_dict()
    demo["model"]["pretrained"] = str(target)
    demo["train"]["output"] = str(tmp_path / "ft")
    cfg_path = write_config(tmp_path / "demo.yaml", demo)
    proc = run_cli(["demo-prepare", "--config", cfg_path], timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert target.exists()
    proc = run_cli(["--config", cfg_path], timeout=600)
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path / "ft")
    assert s["val_top1"] >= 0.6  # 5 classes: chance is 0.2
    assert s["trainable_params"] == 512 * 5 + 5


UNROUNDED = re.compile(r"\d\.\d{5,}")  # 0.35294117647058826, not 0.3529


def test_top5_is_null_with_five_classes_and_log_lines_round_their_figures(tmp_path, pretrained, capsys):
    s = train(tmp_path, pretrained, data={"val": "demo"}, train={"max_steps": 3, "log_every": 1})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[distft]")]
    assert s["val_top5"] is None and read_summary(tmp_path / "out")["val_top5"] is None
    (val,) = [line for line in lines if " val top1 " in line and "done" not in line]
    assert re.fullmatch(r"\[distft\] epoch 0 val top1 \d\.\d{4} top5 n/a loss \d+\.\d{4}", val), val
    (done,) = [line for line in lines if line.startswith("[distft] done:")]
    assert f"val top1 {s['val_top1']:.4f}," in done
    assert not [line for line in lines if UNROUNDED.search(line)]
    events = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    (evaluation,) = [e for e in events if e.get("event") == "eval"]
    assert evaluation["val_top5"] is None and 0 <= evaluation["val_top1"] <= 1


def test_top5_is_reported_with_more_than_five_classes(tmp_path, pretrained, capsys):
    from imagefiles import make_photo_folder

    folder = make_photo_folder(tmp_path / "imgs", ["a", "b", "c", "d", "e", "f"], per_class=3)
    s = train(tmp_path, pretrained, model={"classes": "auto"},
              data={"train": folder, "val": folder, "batch_size": 6}, train={"max_steps": 2})
    assert 0 <= s["val_top1"] <= s["val_top5"] <= 1
    assert re.search(r"val top1 \d\.\d{4} top5 \d\.\d{4} loss", capsys.readouterr().out)


def test_a_relaunch_that_changes_the_job_says_so_in_the_configs_words(tmp_path):
    from distft.components.checkpointer import check_relaunch, job_identity
    from distft.errors import ConfigError

    meta = {"job": job_identity(load_config(None, ["data.augment=false"]))}
    with pytest.raises(ConfigError) as err:
        check_relaunch(load_config(None, ["data.augment=true"]), meta)
    assert str(err.value).startswith("data.augment: this job's checkpoints were written with data.augment: "
                                     "false; this launch asks for true; a resumed job keeps it")
