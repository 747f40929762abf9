"""Classes by name: data.train defines them, data.val is matched by name, model.classes is
resolved or checked, and the names are saved with the run."""
import json

import mxnet as mx
import numpy as np
import pytest

from distft.config import load_config
from distft.data.sets import open_training_sets
from distft.data.sharding import ShardSampler
from distft.errors import ConfigError, DataError

from conftest import read_summary, run_cli, write_config
from imagefiles import folder, png


def sets(**data):
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items() if k != "classes"]
                      + ([f"model.classes={data['classes']}"] if "classes" in data else []))
    return open_training_sets(cfg.data, cfg.model.classes)


def test_val_folder_missing_a_class_is_matched_by_name(tmp_path):
    train = folder(tmp_path / "train", {"ant": 2, "bee": 2, "cat": 2})
    val = folder(tmp_path / "val", {"ant": 1, "cat": 3})  # by position, cat would be label 1
    train_set, val_set, names, n = sets(train=train, val=val)
    assert names == ["ant", "bee", "cat"] and n == 3
    assert list(val_set.labels) == [0, 2, 2, 2]


def test_val_class_the_training_set_lacks_is_an_error_naming_data_val(tmp_path):
    train = folder(tmp_path / "train", {"ant": 2, "bee": 2})
    val = folder(tmp_path / "val", {"ant": 1, "bee": 1, "wasp": 1})
    with pytest.raises(DataError) as err:
        sets(train=train, val=val)
    assert str(err.value) == f"data.val: {val} has classes that data.train lacks: wasp (data.train has ant, bee)"


def test_renamed_val_classes_are_refused(tmp_path):
    train = folder(tmp_path / "train", {"ant": 2, "bee": 2})
    val = folder(tmp_path / "val", {"Ant": 1, "Bee": 1})
    with pytest.raises(DataError, match=r"^data.val: .* has classes that data.train lacks: Ant, Bee"):
        sets(train=train, val=val)


def test_empty_class_folder_in_data_train_is_named(tmp_path):
    train = folder(tmp_path / "train", {"ant": 2, "bee": 0, "cat": 2})
    with pytest.raises(DataError) as err:
        sets(train=train)
    assert str(err.value) == (f"data.train: {train}: class folders without images: bee "
                              "(they would still take a label; remove them or add images)")


def test_model_classes_auto_is_the_number_of_class_folders(tmp_path):
    train = folder(tmp_path / "train", {"ant": 1, "bee": 1, "cat": 1})
    assert load_config(None).model.classes == "auto"
    assert sets(train=train)[3] == 3


@pytest.mark.parametrize("classes", [2, 5])
def test_explicit_model_classes_that_differ_from_the_folders_is_an_error(tmp_path, classes):
    train = folder(tmp_path / "train", {"ant": 1, "bee": 1, "cat": 1})
    with pytest.raises(ConfigError) as err:
        sets(train=train, classes=classes)
    assert str(err.value) == f"model.classes: {classes}, but data.train has 3 classes (ant, bee, cat); set it to 3 or auto"


def write_rec(path, labels):
    writer = mx.recordio.MXIndexedRecordIO(str(path)[:-4] + ".idx", str(path), "w")
    for i, label in enumerate(labels):
        img = np.full((8, 8, 3), i, dtype=np.uint8)
        writer.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), i, 0), png(img)))
    writer.close()
    return str(path)


def test_recordio_labels_are_checked_against_model_classes(tmp_path):
    rec = write_rec(tmp_path / "t.rec", [0, 4, 1, 2])
    assert sets(train=rec)[3] == 5  # auto: largest label + 1
    assert sets(train=rec, classes=7)[3] == 7  # numbers: absent classes are allowed
    with pytest.raises(ConfigError) as err:
        sets(train=rec, classes=3)
    assert str(err.value) == f"model.classes: 3, but data.train ({rec}) has labels up to 4; set it to at least 5 or auto"
    val = write_rec(tmp_path / "v.rec", [0, 6])
    with pytest.raises(DataError) as err:
        sets(train=rec, val=val)
    assert str(err.value) == f"data.val: {val} has labels up to 6, but the model has 5 classes (0 … 4)"


def test_val_split_holds_out_a_seeded_share_that_no_rank_trains_on(tmp_path):
    train = folder(tmp_path / "train", {"ant": 10, "bee": 10})
    a_train, a_val, _, _ = sets(train=train, val_split=0.25, seed=3)
    b_train, b_val, _, _ = sets(train=train, val_split=0.25, seed=3)
    assert 1 <= len(a_val) <= 10 and len(a_val) + len(a_train) == 20  # a quarter, by each file's hash
    assert list(a_val.indices) == list(b_val.indices)  # the same on every rank and launch
    assert not set(a_val.indices) & set(a_train.indices)
    ranks = [ShardSampler(len(a_train), 3, 2, r, seed=0) for r in range(2)]
    seen = {int(a_train.indices[i]) for s in ranks for i in s.permutation(0)}
    assert seen == set(a_train.indices.tolist())  # samplers index the training part only
    assert list(a_val.labels) == [int(i >= 10) for i in a_val.indices]


def test_val_default_is_no_validation_and_split_and_val_exclude_each_other():
    assert load_config(None).data.val is None
    with pytest.raises(ConfigError, match="data.val_split: set either data.val or data.val_split, not both"):
        load_config(None, ["data.val=demo", "data.val_split=0.1"])


def test_run_saves_class_names_and_maps_val_by_name(tmp_path):
    train = folder(tmp_path / "train", {"ant": 8, "bee": 8, "cat": 8})
    val = folder(tmp_path / "val", {"ant": 2, "cat": 2}, seed=1)
    out = tmp_path / "out"
    doc = {"model": {"name": "resnet18_v2", "image_size": 32},
           "data": {"train": train, "val": val, "batch_size": 4, "workers": 0},
           "train": {"max_steps": 2, "output": str(out)}, "metrics": {"port": 0, "report": False}}
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(out / "classes.json")) == ["ant", "bee", "cat"]
    summary = read_summary(out)
    assert summary["classes"] == ["ant", "bee", "cat"]
    assert mx.nd.load(str(out / "model.params"))["output.weight"].shape[0] == 3


def test_val_class_names_match_train_in_any_unicode_form(tmp_path):
    """`café` copied from macOS (NFD) is the `café` data.train has (NFC), in data.val and in a
    .rec's class file alike."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café")
    train = folder(tmp_path / "train", {"café": 2, "tea": 2})
    val = folder(tmp_path / "val", {nfd: 2, "tea": 1})
    _, val_set, names, _ = sets(train=train, val=val)
    assert names == ["café", "tea"] and list(val_set.labels) == [0, 0, 1]


def test_val_split_holds_a_file_out_by_its_name_so_a_grown_data_set_never_leaks():
    """Files added between launches never move a trained-on sample into validation, nor a
    held-out one into training; the share held out is the fraction asked for."""
    from distft.data.sets import held_out

    names = [f"cls{i % 7}/img_{i:05d}.jpg" for i in range(3000)]
    first = held_out(names[:2000], 0.2, seed=5)
    assert 0.18 < first.mean() < 0.22
    grown = held_out(names[:1000] + [f"new/{i}.jpg" for i in range(500)] + names[1000:2000], 0.2, seed=5)
    assert list(grown[:1000]) == list(first[:1000]) and list(grown[1500:]) == list(first)[1000:]
    assert not np.array_equal(held_out(names[:2000], 0.2, seed=6), first)  # data.seed picks another share
