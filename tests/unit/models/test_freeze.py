"""The freeze plan: which parameters train, BN modes, the frozen prefix, byte accounting."""
import json
from types import SimpleNamespace

import mxnet as mx
import pytest

from distft import cli
from distft.models import freeze
from distft.models import gluon, network
from distft.errors import ConfigError

from conftest import write_config


@pytest.fixture(scope="module")
def resnet18():
    net = network.create(SimpleNamespace(name="resnet18_v2", classes=5, pretrained=False, image_size=32,
                                       head="output"), mx.cpu(), 0)
    return net, gluon.describe(net, "resnet18_v2", "output")


def test_forum_case_features_1_is_one_7x7_conv_weight(resnet18):
    """The MXNet forum thread: resnet18_v2, freeze features.1 -> its only parameter is the
    7x7 conv weight (no bias), and its grad_req becomes null."""
    net, spec = resnet18
    everything_but_features_1 = [f"features.{i}" for i in range(13) if i != 1] + ["output"]
    plan = freeze.resolve(spec, everything_but_features_1)
    freeze.apply(net, plan)
    params = gluon.structural_params(net)
    under = [n for n in params if n.startswith("features.1.")]
    assert under == ["features.1.weight"]
    assert params["features.1.weight"].shape == (64, 3, 7, 7)
    assert params["features.1.weight"].grad_req == "null"
    assert params["features.5.0.conv1.weight"].grad_req == "write"


def test_head_only_plan_freezes_all_of_features(resnet18):
    net, spec = resnet18
    plan = freeze.resolve(spec, ["output"])
    assert plan.trainable_names() == ["output.weight", "output.bias"]
    assert set(plan.bn_modes.values()) == {"frozen"}
    assert plan.prefix == [f"features.{i}" for i in range(13)] and plan.suffix == ["output"]
    assert not plan.input_grad


def test_sandwich_plan_keeps_the_middle_frozen(resnet18):
    _, spec = resnet18
    plan = freeze.resolve(spec, ["features.6", "features.8", "output"])
    assert plan.prefix == [f"features.{i}" for i in range(6)]
    assert plan.bn_modes["features.7.0.bn1"] == "frozen"
    assert plan.bn_modes["features.6.0.bn1"] == "train"
    assert not any(n.startswith("features.7.") for n in plan.trainable_names())


def test_synchronized_bn_at_the_suffix_input_asks_for_no_input_gradient(resnet18):
    """A synchronized BN folds its statistics in forward and writes its gamma/beta gradients
    whatever its input needs: the prefix output gets no gradient, so the first trainable BN
    makes no backward exchange. A local BN that only re-estimates statistics still needs one."""
    _, spec = resnet18
    assert not freeze.resolve(spec, ["features.8", "output"]).input_grad
    assert not freeze.resolve(spec, ["features.8", "output"], synchronized_bn=True).input_grad
    assert not freeze.resolve(spec, ["output"], batchnorm="batch", synchronized_bn=True).input_grad
    assert freeze.resolve(spec, ["output"], batchnorm="batch").input_grad


def test_regex_entries_select_parameters(resnet18):
    _, spec = resnet18
    plan = freeze.resolve(spec, [r"/^features\.8\..*conv\d\.weight$/", "output"])
    names = plan.trainable_names()
    assert "features.8.0.conv1.weight" in names and "features.8.0.bn1.gamma" not in names
    assert plan.bn_modes["features.8.0.bn1"] == "frozen"


def test_unknown_block_lists_nearest_paths(resnet18):
    _, spec = resnet18
    with pytest.raises(ConfigError) as err:
        freeze.resolve(spec, ["output", "features.5.3"])
    msg = str(err.value)
    assert msg.startswith("freeze.trainable[1]: no block named 'features.5.3'")
    assert "nearest: " in msg and "features.5.0" in msg


def test_a_parameter_name_is_not_a_block(resnet18):
    _, spec = resnet18
    with pytest.raises(ConfigError, match="that is a parameter"):
        freeze.resolve(spec, ["features.1.weight"])


def test_batch_policy_moves_statistics_layers_out_of_the_prefix(resnet18):
    _, spec = resnet18
    plan = freeze.resolve(spec, ["output"], batchnorm="batch")
    assert plan.prefix == []  # features.0 is a BatchNorm that re-estimates statistics
    assert set(plan.bn_modes.values()) == {"batch"}
    assert plan.input_grad  # backward must reach BNs upstream of the only trainable weight
    assert set(plan.moving_state_names()) == {n for n in (p.name for p in plan.params)
                                              if n.endswith(("running_mean", "running_var"))}


def test_byte_totals_equal_the_real_parameters(resnet18):
    net, spec = resnet18
    plan = freeze.resolve(spec, ["features.8", "output"])
    freeze.apply(net, plan)
    real = gluon.structural_params(net)
    nbytes = {n: p.data().asnumpy().nbytes
              for n, p in real.items()}
    t = plan.totals()
    trainable = [n for n, p in real.items() if p.grad_req == "write"]
    assert t["trainable_bytes"] == sum(nbytes[n] for n in trainable)
    assert t["frozen_bytes"] == sum(b for n, b in nbytes.items() if n not in trainable)
    assert t["trainable_bytes"] + t["frozen_bytes"] == sum(nbytes.values())
    assert t["trainable_params"] == sum(real[n].data().size for n in trainable)


def test_plan_command_json(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {"model": {"name": "resnet18_v2", "classes": 5, "image_size": 32},
                                              "freeze": {"trainable": ["features.8", "output"]}})
    assert cli.main(["plan", "--config", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("trainable_params", "frozen_params", "trainable_bytes", "frozen_bytes", "params", "blocks"):
        assert key in doc
    by_name = {p["name"]: p for p in doc["params"]}
    assert by_name["features.8.0.conv1.weight"]["grad_req"] == "write"
    assert by_name["features.1.weight"] == {"name": "features.1.weight", "shape": [64, 3, 7, 7],
                                            "dtype": "float32", "grad_req": "null", "bytes": 64 * 3 * 7 * 7 * 4}
    assert doc["trainable_bytes"] == sum(p["bytes"] for p in doc["params"] if p["grad_req"] == "write")


def test_plan_command_table(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {"model": {"name": "mobilenet0.25", "classes": 5, "image_size": 32},
                                              "freeze": {"trainable": ["output"]}})
    assert cli.main(["plan", "--config", path, "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["block", "type", "params", "trainable", "BN", "bytes"]
    assert "frozen prefix (no autograd): features.0" in out


def test_pretrained_of_another_architecture_names_mismatches(tmp_path, pretrained):
    from distft.errors import ModelError
    with pytest.raises(ModelError) as err:
        network.create(SimpleNamespace(name="resnet34_v2", classes=5, pretrained=pretrained, image_size=32,
                                     head="output"), mx.cpu(), 0)
    msg = str(err.value)
    assert "does not fit this model" in msg and "missing from the file: features.5.2.bn1.gamma" in msg


def test_pretrained_with_wrong_shapes_names_them(tmp_path):
    from conftest import make_pretrained
    from distft.errors import ModelError
    path = make_pretrained(tmp_path / "wide.params", name="resnet18_v2", classes=5)
    arrays = mx.nd.load(path)
    arrays["features.1.weight"] = mx.nd.zeros((64, 3, 5, 5))
    mx.nd.save(path, arrays)
    with pytest.raises(ModelError, match=r"mis-shaped: features.1.weight \(file \(64, 3, 5, 5\), model \(64, 3, 7, 7\)\)"):
        network.create(SimpleNamespace(name="resnet18_v2", classes=5, pretrained=path, image_size=32,
                                     head="output"), mx.cpu(), 0)


def test_not_a_params_file(tmp_path):
    from distft.errors import ModelError
    bad = tmp_path / "x.params"
    bad.write_bytes(b"definitely not mxnet")
    with pytest.raises(ModelError, match="not an MXNet .params file"):
        network.load_pretrained(mx.gluon.nn.Dense(2), str(bad), "output", mx.cpu())
