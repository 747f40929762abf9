"""`distft predict`: top-k class names with probabilities; an unreadable image is reported, not fatal."""
import csv
import json
import shutil

import numpy as np
import pytest

from conftest import small_config, write_config
from distft import cli
from distft.config import load_config
from distft.distributed.world import LocalWorld
from distft.train.run import run

from imagefiles import make_photo_folder

CLASSES = ["cat", "dog", "emu", "fox", "owl", "yak"]  # sorted, as ImageFolder numbers them


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, pretrained):
    """A run trained with model.classes: auto (as the README recommends) on a 6-class folder of
    JPEG photos of several kinds and PNGs (also the folder to predict): predict reads the class
    count and names from the run (classes.json)."""
    tmp = tmp_path_factory.mktemp("predict")
    folder = make_photo_folder(tmp / "imgs", CLASSES, per_class=3)
    doc = small_config(tmp, pretrained, model={"classes": "auto"}, freeze={"trainable": ["output"]},
                       data={"train": folder, "val": None, "batch_size": 6}, optimizer={"lr": 0.05},
                       train={"max_steps": None, "epochs": 10})
    cfg = write_config(tmp / "c.yaml", doc)
    run(load_config(cfg), LocalWorld())
    return cfg, folder


def test_folder_with_a_corrupt_image(folder_run, tmp_path):
    cfg, folder = folder_run
    shutil.copytree(folder, tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "p.json"
    assert cli.main(["predict", "--config", cfg, "--images", str(tmp_path / "imgs"), "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert len(results) == 6 * 3 + 1
    (bad,) = [r for r in results if "error" in r]
    assert bad["image"].endswith("dog/broken.png") and "not an image" in bad["error"] and "top" not in bad
    for r in results:
        if "error" in r:
            continue
        assert len(r["top"]) == 5  # min(5, classes)
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
        assert {t["class"] for t in r["top"]} <= set(CLASSES)


def test_top1_of_predict_is_what_eval_counts(folder_run, tmp_path):
    """Same network, same preprocessing: predict's top-1 per image gives eval's confusion matrix."""
    cfg, folder = folder_run
    assert cli.main(["predict", "--config", cfg, "--images", folder, "--top-k", "1",
                     "--output", str(tmp_path / "p.json")]) == 0
    assert cli.main(["eval", "--config", cfg, "--data", folder, "--json", str(tmp_path / "e.json")]) == 0
    confusion = np.zeros((6, 6), dtype=int)
    for r in json.loads((tmp_path / "p.json").read_text()):
        confusion[CLASSES.index(r["image"].split("/")[-2]), CLASSES.index(r["top"][0]["class"])] += 1
    report = json.loads((tmp_path / "e.json").read_text())
    assert confusion.tolist() == report["confusion"]
    assert len(set(np.argmax(confusion, axis=1))) > 1  # not one class for everything


def test_csv_columns_and_rows(folder_run, tmp_path):
    cfg, folder = folder_run
    (tmp_path / "broken.png").write_bytes(b"GIF89a")
    out = tmp_path / "p.csv"
    assert cli.main(["predict", "--config", cfg, "--images", f"{folder}/cat", str(tmp_path / "broken.png"),
                     "--top-k", "2", "--output", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "rank", "class", "prob"]
    assert len(rows) == 3 * 2 + 1
    assert [r["rank"] for r in rows[:2]] == ["1", "2"] and float(rows[0]["prob"]) >= float(rows[1]["prob"])
    assert rows[-1]["image"].endswith("broken.png") and rows[-1]["class"] == ""


@pytest.mark.parametrize("args, message", [
    (["--top-k", "7"], "--top-k: must be between 1 and model.classes (6), got 7"),
    (["--output", "x.txt"], "--output: x.txt: must end in .json or .csv"),
])
def test_bad_arguments_are_one_line(folder_run, tmp_path, capsys, args, message):
    cfg, folder = folder_run
    base = {"--output": str(tmp_path / "p.json")}
    argv = ["predict", "--config", cfg, "--images", folder]
    argv += args + (["--output", base["--output"]] if "--output" not in args else [])
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"distft: error: {message}"


@pytest.mark.horovod
def test_predict_under_horovodrun_shares_the_images_and_writes_what_one_process_writes(folder_run, tmp_path):
    from conftest import horovodrun, run_cli

    cfg, folder = folder_run
    assert cli.main(["predict", "--config", cfg, "--images", folder, "--output", str(tmp_path / "one.json")]) == 0
    proc = run_cli(["predict", "--config", cfg, "--images", folder, "--output", str(tmp_path / "two.json")],
                   launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "predict: 18 images, 0 unreadable" in proc.stdout and "(2 ranks)" in proc.stdout
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert [r["image"] for r in two] == [r["image"] for r in one]
    for a, b in zip(one, two):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert max(abs(x["prob"] - y["prob"]) for x, y in zip(a["top"], b["top"])) <= 1e-6


def test_predict_on_a_users_folder_skips_hidden_files_and_reads_nested_ones(folder_run, tmp_path):
    from imagefiles import make_users_folder

    cfg, _ = folder_run
    root = make_users_folder(tmp_path / "photos")
    assert cli.main(["predict", "--config", cfg, "--images", root, "--output", str(tmp_path / "p.json")]) == 0
    results = json.loads((tmp_path / "p.json").read_text())
    assert len(results) == 30 and sum("error" in r for r in results) == 1  # the truncated JPEG only
    assert not any("/." in r["image"] or "._" in r["image"] for r in results)
