"""`distft check` and `distft make-rec`: every file read once, verdicts cached, the bad-file
rule, RecordIO written without OpenCV and read back by distft."""
import json
import os

import numpy as np

from distft.config import load_config
from distft.data.datasets import RecordFile
from distft.data.sets import open_dataset
from distft.distributed.world import LocalWorld
from distft.data.check import check
from distft.data.makerec import make_rec

from conftest import run_cli, write_config
from imagefiles import folder

BROKEN = b"\x89PNG\r\n\x1a\n this is not a picture"


def test_check_reports_unreadable_files_classes_and_sizes(tmp_path):
    train = folder(tmp_path / "train", {"ant": 3, "bee": 2}, size=12)
    (tmp_path / "train" / "bee" / "big.png").write_bytes(open(os.path.join(train, "ant", "0.png"), "rb").read())
    (tmp_path / "train" / "ant" / "bad.png").write_bytes(BROKEN)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not read")
    cfg = load_config(None, [f"data.train={train}"])
    [report] = check(cfg, jobs=2, cache_path=str(tmp_path / "cache.json"))
    assert report.files == 7 and report.read == 7
    assert report.ignored == [f"{train}/ant/notes.txt"]
    assert report.class_counts == {"ant": 4, "bee": 3}
    assert report.unreadable == [f"{train}/ant/bad.png: not an image (unknown format, {len(BROKEN)} bytes)"]
    assert report.sizes() == {"width": [12, 12, 12], "height": [12, 12, 12]}
    assert report.limit == 10  # max(0.001 x 7, 10): one bad file in a small set is not fatal


def test_second_check_reads_only_changed_files(tmp_path):
    train = folder(tmp_path / "train", {"ant": 40, "bee": 40})
    cfg = load_config(None, [f"data.train={train}"])
    cache = str(tmp_path / "cache.json")
    assert check(cfg, jobs=2, cache_path=cache)[0].read == 80
    again = check(cfg, jobs=2, cache_path=cache)[0]
    assert again.read == 0 and again.unreadable == []
    (tmp_path / "train" / "bee" / "3.png").write_bytes(BROKEN)  # size and mtime change
    third = check(cfg, jobs=2, cache_path=cache)[0]
    assert third.read == 1 and len(third.unreadable) == 1 and third.unreadable[0].startswith(f"{train}/bee/3.png: ")


def test_check_cli_exits_2_past_the_bad_file_limit(tmp_path):
    train = folder(tmp_path / "train", {"ant": 3, "bee": 3})
    (tmp_path / "train" / "ant" / "bad.png").write_bytes(BROKEN)
    (tmp_path / "train" / "bee" / "bad.png").write_bytes(BROKEN)
    cfg = write_config(tmp_path / "c.yaml", {"data": {"train": train, "max_bad_files": 1}})
    proc = run_cli(["check", "--config", cfg, "--cache", str(tmp_path / "cache.json")], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"distft: error: data.train: 2 unreadable files of 8, more than the 1 allowed (max(data.max_bad_fraction "
        f"x files, data.max_bad_files)); first: {train}/ant/bad.png: not an image (unknown format, {len(BROKEN)} bytes)")
    assert "data.train: " in proc.stdout and "per class: ant: 4 (1 unreadable), bee: 4 (1 unreadable)" in proc.stdout


def test_make_rec_writes_recordio_distft_reads_with_class_names(tmp_path):
    train = folder(tmp_path / "train", {"ant": 40, "bee": 30, "cat": 2}, size=10)
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(BROKEN)
    rec = str(tmp_path / "out" / "train.rec")
    proc = run_cli(["make-rec", train, rec, "--jobs", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped (unreadable): {train}/cat/bad.png: not an image" in proc.stdout
    assert json.load(open(tmp_path / "out" / "train.classes.json")) == ["ant", "bee", "cat"]
    ds = open_dataset(rec, "train", "data.train")
    folder_ds = open_dataset(train, "train", "data.train")
    assert isinstance(ds, RecordFile) and len(ds) == 72 and ds.class_names == ["ant", "bee", "cat"]
    assert list(np.bincount(ds.labels)) == [40, 30, 2]
    good = [i for i, f in enumerate(folder_ds.files) if not f.endswith("bad.png")]
    for k in (0, 41, 71):
        assert np.array_equal(ds.read(k), folder_ds.read(good[k]))
    # and check reads it in plain Python
    cfg = load_config(None, [f"data.train={rec}"])
    [report] = check(cfg, jobs=2, cache_path=str(tmp_path / "cache.json"))
    assert report.kind == "RecordIO" and report.read == 72 and report.unreadable == []
    assert report.class_counts == {"ant": 40, "bee": 30, "cat": 2}


def test_make_rec_resize_reencodes_with_the_short_side_given(tmp_path):
    train = folder(tmp_path / "train", {"ant": 2, "bee": 2}, size=40)
    rec = str(tmp_path / "r.rec")
    make_rec(train, rec, resize=16, jobs=1)
    assert open_dataset(rec, "train", "data.train").read(3).shape == (16, 16, 3)


def test_training_loader_counts_unreadable_files_not_reads(tmp_path):
    from distft.data.loader import BatchLoader
    from distft.data.transforms import Transform
    from distft.errors import DataError
    import pytest

    train = folder(tmp_path / "train", {"ant": 3, "bee": 3})
    ds = open_dataset(train, "train", "data.train")
    with open(ds.files[0], "wb") as fh:  # turns bad after any check ran
        fh.write(BROKEN)
    t = Transform(8, [0.5] * 3, [0.25] * 3, False, 0)
    tolerant = BatchLoader(ds, t, workers=0, max_bad_fraction=0.0, max_bad_files=1)
    for epoch in range(3):  # the same bad file, read every epoch, is still one file
        tolerant.batch(np.array([0, 1, 2]), epoch)
    assert tolerant.bad == 3 and tolerant.bad_files == {0}
    strict = BatchLoader(ds, t, workers=0, max_bad_fraction=0.0, max_bad_files=0)
    with pytest.raises(DataError) as err:
        strict.batch(np.array([0, 1, 2]), 0)
    assert str(err.value) == (f"data.max_bad_fraction: 1 unreadable files, more than the 0 allowed of 6; latest: "
                              f"{ds.files[0]}: not an image (unknown format, {len(BROKEN)} bytes)")


class Rank(LocalWorld):
    """One of two ranks whose allgather sees what the other has already sent."""

    def __init__(self, rank, sent):
        self.rank, self.size, self.sent = rank, 2, sent

    def allgather_bytes(self, payload, name):
        self.sent[self.rank] = payload
        return [self.sent.get(r, b"[]") for r in range(self.size)]


def test_pass_before_training_splits_files_across_ranks_and_leaves_bad_ones_out_on_every_rank(tmp_path):
    from distft.data.check import without_unreadable

    train = folder(tmp_path / "train", {"ant": 3, "bee": 3})
    ds = open_dataset(train, "train", "data.train")
    with open(ds.files[1], "wb") as fh:  # position 1: rank 1's share
        fh.write(BROKEN)
    cfg = load_config(None, [f"data.train={train}"])
    sent, logged = {}, []
    views = [without_unreadable(ds, "data.train", Rank(r, sent), cfg.data, str(tmp_path / "c.json"), logged.append)
             for r in (1, 0)]
    for view in views:
        assert len(view) == 5 and list(view.indices) == [0, 2, 3, 4, 5]
    assert sorted(os.listdir(tmp_path)) == ["c-rank0.json", "c-rank1.json", "train"]
    assert logged[-1].startswith("warning: data.train: 1 unreadable file(s) of 6 left out (limit 10): ")


def test_check_counts_per_class_what_it_read_found_unreadable_and_ignored(tmp_path):
    from imagefiles import make_users_folder

    root = make_users_folder(tmp_path / "photos")
    [report] = check(load_config(None, [f"data.train={root}"]), jobs=2, cache_path=str(tmp_path / "c.json"))
    assert report.files == 30 and len(report.unreadable) == 1  # the truncated JPEG; not ._000.jpg
    assert report.unreadable[0].startswith(f"{root}/cat/truncated.jpg: cannot decode image")
    assert report.per_class == {"café": {"files": 6, "unreadable": 0, "ignored": 1},
                                "cat": {"files": 7, "unreadable": 1, "ignored": 1},
                                "dog": {"files": 10, "unreadable": 0, "ignored": 1},
                                "red fox": {"files": 7, "unreadable": 0, "ignored": 0}}
    assert "  per class: café: 6 (1 ignored), cat: 7 (1 unreadable, 1 ignored), dog: 10 (1 ignored), red fox: 7" \
        in report.text().splitlines()
    assert len(report.ignored) == 5
