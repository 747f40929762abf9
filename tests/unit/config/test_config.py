"""Config: typed, strict, overridable; every bad value is a one-line error naming the key."""
import os

import pytest
import yaml

from distft import cli
from distft.config import load_config
from distft.errors import ConfigError

from conftest import run_cli, write_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["optimizer.lr=0.5", "freeze.trainable=[features.8, output]",
                             "model.pretrained=true", "data.val=null"])
    assert cfg.optimizer.lr == 0.5
    assert cfg.freeze.trainable == ["features.8", "output"]
    assert cfg.model.pretrained is True
    assert cfg.data.val is None
    assert cfg.freeze.batchnorm == "frozen"


def test_bucket_bytes_is_auto_unless_set():
    assert load_config(None, []).dist.bucket_bytes == "auto"
    assert load_config(None, ["dist.bucket_bytes=65536"]).dist.bucket_bytes == 65536


def test_integer_is_accepted_for_a_float_key():
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E-3", 1e-3), ("5e-5", 5e-5), ("1.0e3", 1000.0),
                                         ("+2e-2", 0.02), (".5e-1", 0.05), ("1.5E+2", 150.0)])
def test_a_number_with_an_exponent_is_a_number_in_set(text, value):
    """YAML 1.1 (PyYAML's) reads 1e-3 as a string; people write learning rates that way."""
    assert load_config(None, [f"optimizer.lr={text}"]).optimizer.lr == pytest.approx(value)


def test_a_number_with_an_exponent_is_a_number_in_the_config_file_and_the_grid(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-4\n  weight_decay: 5E-5\n  min_lr: 1e-6\n"
                    "data: {val_split: 0.1}\nheads:\n  grid:\n    optimizer.lr: [1e-3, 3e-3]\n")
    cfg = load_config(str(path))
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.min_lr) == (1e-4, 5e-5, 1e-6)
    assert cfg.heads.grid == {"optimizer.lr": [1e-3, 3e-3]}
    cfg = load_config(str(path), ["heads.grid={optimizer.lr: [1e-2, 2e-2], optimizer.weight_decay: [0, 1e-4]}"])
    assert cfg.heads.grid == {"optimizer.lr": [0.01, 0.02], "optimizer.weight_decay": [0, 1e-4]}


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=1e-3x", "optimizer.lr: expected a number, got '1e-3x'"),
    ("optimizer.lr=e-3", "optimizer.lr: expected a number, got 'e-3'"),
    ("optimizer.lr='1e-3'", "optimizer.lr: expected a number, got '1e-3'"),  # quoted: the user said string
    ("heads.grid={optimizer.lr: [1e-3, 1e-3e]}", "heads.grid.optimizer.lr[1]: expected a number, got '1e-3e'"),
])
def test_a_string_that_only_looks_like_a_number_is_still_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.val_split=0.1", override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("model.nmae=x", "model.nmae: unknown key (did you mean 'model.name'?)"),
    ("optimzer.lr=0.1", "optimzer: unknown key (did you mean 'optimizer'?)"),
    ("optimizer.lr=fast", "optimizer.lr: expected a number, got 'fast'"),
    ("optimizer.lr=-1", "optimizer.lr: must be >= 0.0"),
    ("optimizer.name=sdg", "optimizer.name: must be one of sgd, nag, adam, lbfgs, got 'sdg' (did you mean 'sgd'?)"),
    ("data.batch_size=0", "data.batch_size: must be >= 1"),
    ("data.batch_size=2.5", "data.batch_size: expected an integer"),
    ("data.augment=maybe", "data.augment: expected true/false"),
    ("freeze.trainable=output", "freeze.trainable: expected a list of strings, got 'output'"),
    ("data.mean=0.5", "data.mean: expected a list of numbers, got 0.5"),
    ("optimizer.step_epochs=1", "optimizer.step_epochs: expected a list of integers"),
    ("freeze.trainable=['/(/']", "freeze.trainable[0]: bad regex"),
    ("freeze.batchnorm=frozn", "freeze.batchnorm: must be one of frozen, batch"),
    ("freeze.schedule=[{epoch: 1, unfreze: [a]}]", "freeze.schedule[0].unfreze: unknown key (did you mean 'unfreeze'?)"),
    ("freeze.schedule=[{epoch: -1, unfreeze: [a]}]", "freeze.schedule[0].epoch: expected an integer >= 0"),
    ("freeze.schedule=[{epoch: 1, unfreeze: [a]}]",  # train.epochs: 1 (epochs 0 .. 0)
     "freeze.schedule[0].epoch: 1, but train.epochs is 1 (epochs 0 to 0), so this stage would never start "
     "(to stop a launch before it, set train.max_steps)"),
    ("optimizer.schedule=step", "optimizer.step_epochs: the `step` schedule needs at least one epoch"),
    ("model=3", "model: expected a mapping of keys"),
    ("data.std=[1, 0, 1]", "data.std: every value must be > 0"),
    ("optimizer.lr=.nan", "optimizer.lr: must be a finite number"),
    ("dist.batchnorm=global", "dist.batchnorm: must be one of sync, local"),
    ("dist.bucket_bytes=big", "dist.bucket_bytes: expected an integer or auto, got 'big'"),
    ("dist.bucket_bytes=-1", "dist.bucket_bytes: must be >= 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_a_freeze_stage_past_the_last_epoch_is_refused_naming_it():
    schedule = "freeze.schedule=[{epoch: 1, unfreeze: [features.8]}, {epoch: 5, unfreeze: [features.7]}]"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=3", schedule])
    assert str(err.value) == ("freeze.schedule[1].epoch: 5, but train.epochs is 3 (epochs 0 to 2), so this "
                              "stage would never start (to stop a launch before it, set train.max_steps)")
    assert [s["epoch"] for s in load_config(None, ["train.epochs=6", schedule]).freeze.schedule] == [1, 5]


def test_bad_yaml_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(path))


def test_missing_file_and_non_mapping_top_level(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))


BAD_CONFIGS = [
    ({"model": {"name": "resnet18_v3"}}, "model.name: no model-zoo network named 'resnet18_v3' (did you mean"),
    ({"model": {"pretrained": "/nonexistent/x.params", "classes": 5}}, "model.pretrained: /nonexistent/x.params: no such file"),
    ({"model": {"head": "classifier"}}, "model.head: resnet18_v2 has no top-level block 'classifier'"),
    ({"freeze": {"trainable": ["features.13"]}}, "freeze.trainable[0]: no block named 'features.13'"),
    ({"freeze": {"trainable": ["/nomatch_here/"]}}, "freeze.trainable[0]: /nomatch_here/ matches no parameter"),
    ({"optimizer": {"lr": "x"}}, "optimizer.lr: expected a number"),
    ({"model": {"image_size": 4}}, "model.image_size: must be >= 8"),
]


@pytest.mark.parametrize("doc, message", BAD_CONFIGS)
def test_cli_prints_one_line_error_never_a_traceback(tmp_path, capsys, doc, message):
    doc.setdefault("model", {}).setdefault("image_size", 32)
    path = write_config(tmp_path / "c.yaml", doc)
    code = cli.main(["plan", "--config", path])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distft: error: ") and message in lines[0], lines[0]


def test_train_exits_2_with_one_line_on_bad_config(tmp_path, capsys):
    from distft import cli

    path = write_config(tmp_path / "c.yaml", {"optimizer": {"nmae": "sgd"}})
    assert cli.main(["--config", path]) == 2
    assert capsys.readouterr().err.strip() == \
        "distft: error: optimizer.nmae: unknown key (did you mean 'optimizer.name'?)"


def test_resolved_config_is_written_to_output(tmp_path, pretrained):
    from conftest import small_config
    doc = small_config(tmp_path, pretrained, train={"max_steps": 1})
    path = write_config(tmp_path / "c.yaml", doc)
    proc = run_cli(["--config", path, "--set", "optimizer.lr=0.02"], timeout=180)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(open(os.path.join(doc["train"]["output"], "config.yaml")))
    assert resolved["optimizer"]["lr"] == 0.02
    assert resolved["data"]["workers"] == 0  # from the file
    assert resolved["dist"]["batchnorm"] == "sync"  # a default, written out
