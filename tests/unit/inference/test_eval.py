"""`distft eval`: the trained network on a data set, by the same code path as training's val_top1."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import horovodrun, read_summary, run_cli, small_config, write_config
from distft.components import checkpoint
from distft import cli
from distft.data import demo
from distft.config import load_config
from distft.distributed.world import LocalWorld
from distft.data.preprocess import Preprocess
from distft.train.run import run

from imagefiles import make_folder, make_photo_folder

TRAIN = {"trainable": ["features.8", "output"]}  # a trainable stage: BN statistics move


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, pretrained):
    """A short run on the demo digits with validation: its config and summary."""
    tmp = tmp_path_factory.mktemp("run")
    path = write_config(tmp / "cfg.yaml", small_config(tmp, pretrained, freeze=TRAIN, data={"val": "demo"},
                                                       optimizer={"lr": 0.01}, train={"max_steps": 12}))
    run(load_config(path), LocalWorld())
    return path, read_summary(tmp / "out"), tmp / "out"


def eval_json(args):
    assert cli.main(["eval"] + args) == 0
    with open(args[args.index("--json") + 1]) as fh:
        return json.load(fh)


def test_eval_top1_equals_the_runs_val_top1(trained_run, tmp_path):
    cfg, summary, _ = trained_run
    report = eval_json(["--config", cfg, "--json", str(tmp_path / "eval.json")])
    assert report["top1"] == summary["val_top1"]
    assert report["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert report["top5"] is None  # 5 classes: top-5 is always 1
    assert report["samples"] == len(demo.dataset("demo", "val"))


def test_per_class_figures_add_up_to_top1(trained_run, tmp_path):
    cfg, summary, _ = trained_run
    report = eval_json(["--config", cfg, "--json", str(tmp_path / "eval.json")])
    per = report["per_class"]
    assert list(per) == ["5", "6", "7", "8", "9"]  # the demo digits, from the run's classes.json
    assert sum(c["count"] for c in per.values()) == report["samples"]
    correct = sum(c["recall"] * c["count"] for c in per.values() if c["count"])
    assert correct / report["samples"] == pytest.approx(report["top1"])
    confusion = np.array(report["confusion"])
    for i, c in enumerate(per.values()):
        predicted = confusion[:, i].sum()
        assert c["precision"] == (confusion[i, i] / predicted if predicted else None)
    with open(tmp_path / "eval.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_saves_its_preprocessing(trained_run):
    cfg, _, out = trained_run
    saved = Preprocess.load(str(out / "preprocess.json"))
    assert saved == Preprocess.from_config(load_config(cfg))
    assert (saved.resize_short, saved.crop, saved.channel_order, saved.layout) == (32, 32, "RGB", "NCHW")


def test_eval_of_the_last_checkpoint_equals_model_params(trained_run, tmp_path):
    cfg, summary, out = trained_run
    last = checkpoint.list_checkpoints(str(out))[-1]
    assert checkpoint.load(last).meta["step"] == summary["steps"]
    report = eval_json(["--config", cfg, "--checkpoint", last, "--json", str(tmp_path / "ck.json")])
    assert report["top1"] == summary["val_top1"] and report["model"] == last


@pytest.mark.horovod
def test_eval_on_two_ranks_equals_val_top1(trained_run, tmp_path):
    cfg, summary, _ = trained_run
    out = tmp_path / "two.json"
    proc = run_cli(["eval", "--config", cfg, "--json", str(out)], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["samples"] == len(demo.dataset("demo", "val"))
    assert report["top1"] == summary["val_top1"]


def test_eval_on_a_folder_names_its_classes(tmp_path, pretrained):
    folder = make_folder(tmp_path / "imgs", ["cat", "dog", "fox"])
    doc = small_config(tmp_path, pretrained, model={"classes": 3}, data={"train": folder, "val": None})
    cfg = write_config(tmp_path / "c.yaml", doc)
    run(load_config(cfg), LocalWorld())
    report = eval_json(["--config", cfg, "--data", folder, "--json", str(tmp_path / "e" / "r.json")])
    assert report["classes"] == ["cat", "dog", "fox"] and set(report["per_class"]) == {"cat", "dog", "fox"}
    assert [c["count"] for c in report["per_class"].values()] == [4, 4, 4]
    assert os.path.getsize(tmp_path / "e" / "r.png") > 1000
    # classes are matched by name against the run's own (classes.json), never by folder position
    (tmp_path / "out" / "classes.json").write_text(json.dumps(["kat", "hond", "vos"]))
    assert cli.main(["eval", "--config", cfg, "--data", folder, "--json", str(tmp_path / "r2.json")]) == 2
    assert not (tmp_path / "r2.json").exists()


def test_eval_without_a_trained_model_is_one_line(tmp_path, pretrained, capsys):
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, data={"val": "demo"}))
    assert cli.main(["eval", "--config", cfg, "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"distft: error: train.output: {tmp_path}/out/model.params: no such file "
                   "(train first, or give --checkpoint DIR)")


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, pretrained):
    """A run trained with model.classes: auto (as the README recommends) on JPEG photos of
    several kinds and PNGs, validated on a folder of them."""
    tmp = tmp_path_factory.mktemp("photos")
    train = make_photo_folder(tmp / "train", ["cat", "dog", "fox"], per_class=8, seed=1)
    val = make_photo_folder(tmp / "val", ["cat", "dog", "fox"], per_class=4, seed=2)
    path = write_config(tmp / "c.yaml", small_config(tmp, pretrained, model={"classes": "auto"},
                                                     data={"train": train, "val": val, "batch_size": 6},
                                                     train={"max_steps": None, "epochs": 2}))
    run(load_config(path), LocalWorld())
    return path, read_summary(tmp / "out")


def test_eval_reads_the_runs_classes_when_model_classes_is_auto(photo_run, tmp_path):
    cfg, summary = photo_run
    report = eval_json(["--config", cfg, "--json", str(tmp_path / "e.json")])
    assert report["classes"] == ["cat", "dog", "fox"] and report["samples"] == 12 and report["bad_samples"] == 0
    assert report["top1"] == summary["val_top1"]


@pytest.mark.horovod
def test_eval_of_jpeg_photos_under_horovodrun_equals_val_top1(photo_run, tmp_path):
    cfg, summary = photo_run
    out = tmp_path / "two.json"
    proc = run_cli(["eval", "--config", cfg, "--json", str(out)], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["samples"] == 12 and report["bad_samples"] == 0
    assert report["top1"] == summary["val_top1"]


@pytest.fixture(scope="module")
def users_folder(tmp_path_factory):
    from imagefiles import make_users_folder

    tmp = tmp_path_factory.mktemp("users")
    return make_users_folder(tmp / "photos"), make_users_folder(tmp / "val", seed=1), tmp


def test_eval_on_a_class_subset_equals_training_validation_on_it(users_folder, pretrained, tmp_path):
    """eval matched classes by folder position: on a folder of only `dog` and `red fox` it counted
    dogs as `café` and foxes as `cat` (top-1 0.5, confusion [[8,0,0,0],[8,0,0,0],…]), where
    training's validation on the same folder (matched by name) said otherwise."""
    from distft.data.makerec import make_rec

    train, val, _ = users_folder
    subset = tmp_path / "val_sub"
    for name in ("dog", "red fox"):
        shutil.copytree(os.path.join(val, name), subset / name)
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, model={"classes": "auto"},
                                                         data={"train": train, "val": str(subset), "batch_size": 4},
                                                         train={"max_steps": None, "epochs": 2}))
    run(load_config(cfg), LocalWorld())
    summary = read_summary(tmp_path / "out")
    assert summary["data"]["data.val"]["files"] == 17
    report = eval_json(["--config", cfg, "--data", str(subset), "--json", str(tmp_path / "e.json")])
    assert report["samples"] == 17 and report["top1"] == summary["val_top1"]
    assert np.array(report["confusion"])[:2].sum() == 0  # nothing counted as café or cat
    rec = make_rec(str(subset), str(tmp_path / "val_sub.rec"), jobs=1)["rec"]
    report = eval_json(["--config", cfg, "--data", rec, "--json", str(tmp_path / "r.json")])
    assert report["samples"] == 17 and report["top1"] == summary["val_top1"]


def test_eval_defaults_to_the_runs_val_split_and_leaves_out_what_training_left_out(users_folder, pretrained,
                                                                                   tmp_path):
    """eval refused a run trained with data.val_split ('data.val: not set'); it now scores the same
    held-out files training validated on, unreadable ones left out by the same allowance."""
    train, _, _ = users_folder
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, model={"classes": "auto"},
                                                         data={"train": train, "val_split": 0.4, "batch_size": 4},
                                                         train={"max_steps": None, "epochs": 1}))
    run(load_config(cfg), LocalWorld())
    summary = read_summary(tmp_path / "out")
    report = eval_json(["--config", cfg, "--json", str(tmp_path / "e.json")])
    held_out = summary["data"]["data.val_split"]["files"]
    assert report["samples"] == summary["val_samples"]
    assert report["top1"] == summary["val_top1"] and report["bad_samples"] == 0
    assert report["samples"] in (held_out, held_out - 1)  # less the truncated JPEG when it was held out
    assert report["data"] == f"{train} (data.val_split 0.4)"
    # the photos in dog/from_phone/2023/ were trained on (or held out) with the rest of dog/
    assert summary["data"]["data.train"]["per_class"]["dog"] == {"files": 10, "unreadable": 0, "ignored": 1}
