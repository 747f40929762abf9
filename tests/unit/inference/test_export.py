"""`distft export`: MXNet symbol+params and ONNX, each reloaded and compared with the trained network."""
import json
import os
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import onnxruntime
import pytest
from PIL import Image

from conftest import ROOT, small_config, write_config
from distft import cli
from distft.data import demo
from distft.inference import export
from distft.config import load_config
from distft.distributed.world import LocalWorld
from distft.errors import ModelError
from distft.data.preprocess import Preprocess
from distft.train.run import run

from imagefiles import make_photo_folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, pretrained):
    tmp = tmp_path_factory.mktemp("export")
    cfg = write_config(tmp / "c.yaml", small_config(tmp, pretrained, freeze={"trainable": ["features.8", "output"]},
                                                    train={"max_steps": 4}))
    run(load_config(cfg), LocalWorld())
    return cfg, tmp / "out"


def real_batch(out_dir, n=6):
    """Demo images through the run's saved preprocessing: what a server would send."""
    prep = Preprocess.load(str(out_dir / "preprocess.json"))
    transform, images = prep.transform(), demo.dataset("demo", "val")
    return np.stack([transform(images.read(i), 0, i) for i in range(n)])


def plain_network_logits(out_dir, x):
    """The trained weights in a fresh, imperative model-zoo network (not distft's code path)."""
    net = mx.gluon.model_zoo.vision.get_model("resnet18_v2", classes=5)
    net.load_parameters(str(out_dir / "model.params"))
    return net(mx.nd.array(x)).asnumpy()


def test_mxnet_export_reloads_with_the_same_logits(trained_run, tmp_path, capsys):
    cfg, out = trained_run
    path = tmp_path / "served" / "net"
    assert cli.main(["export", "--config", cfg, "--format", "mxnet", "--output", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "input: float32 NCHW (1, 3, 32, 32)" in printed and "channels RGB" in printed
    assert "mean: [0.485, 0.456, 0.406]" in printed and "std: [0.229, 0.224, 0.225]" in printed
    block = mx.gluon.SymbolBlock.imports(f"{path}-symbol.json", ["data"], f"{path}-0000.params")
    x = real_batch(out)
    diff = np.abs(block(mx.nd.array(x)).asnumpy() - plain_network_logits(out, x)).max()
    assert diff <= 1e-4
    side = json.loads((tmp_path / "served" / "net-input.json").read_text())
    assert side["input"]["crop"] == 32 and side["classes"] == ["5", "6", "7", "8", "9"]


def test_onnx_export_reloads_with_the_same_logits(trained_run, tmp_path):
    cfg, out = trained_run
    path = tmp_path / "net.onnx"
    assert cli.main(["export", "--config", cfg, "--format", "onnx", "--output", str(path)]) == 0
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "data" and inp.shape[1:] == [3, 32, 32]
    x = real_batch(out, n=3)  # not the batch size it was exported with: the batch axis is dynamic
    got = session.run(None, {"data": x})[0]
    diff = np.abs(got - plain_network_logits(out, x)).max()
    assert diff <= 1e-4
    assert os.path.isfile(tmp_path / "net-input.json")


def test_onnx_weights_are_initializers_and_data_is_the_only_input(trained_run, tmp_path):
    """MXNet 1.9.1's exporter lists every weight as a graph input too: onnxruntime then warns
    once per weight per session and treats them as overridable (no constant folding)."""
    import onnx

    cfg, out = trained_run
    path = tmp_path / "net.onnx"
    assert cli.main(["export", "--config", cfg, "--format", "onnx", "--output", str(path)]) == 0
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["data"] and len(graph.initializer) > 90
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_overridable_initializers() == []
    # a session with onnxruntime's default logging says nothing about the model
    probe = ("import onnxruntime, sys; onnxruntime.InferenceSession(sys.argv[1], "
             "providers=['CPUExecutionProvider'])")
    proc = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "graph inputs" not in proc.stderr, proc.stderr


def test_an_export_that_does_not_match_is_removed(trained_run, tmp_path, monkeypatch):
    cfg, _ = trained_run
    monkeypatch.setattr(export, "run_mxnet", lambda files, x: np.zeros((x.shape[0], 5), np.float32))
    with pytest.raises(ModelError, match=r"--format mxnet: the reloaded export's logits differ .* nothing written"):
        export.run(load_config(cfg), "mxnet", str(tmp_path / "net"))
    assert os.listdir(tmp_path) == []


def test_served_onnx_model_answers_as_predict_does(trained_run, tmp_path):
    """launch/serve_onnx.py (onnxruntime, Pillow, numpy; no MXNet) with the exported model and
    its input spec gives what `distft predict` gives, on images that need resizing and cropping."""
    cfg, _ = trained_run
    folder = make_photo_folder(tmp_path / "imgs", ["a", "b"], per_class=6, sizes=((45, 61), (70, 45)))
    images = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.*g"))  # every kind, EXIF-rotated included
    assert cli.main(["export", "--config", cfg, "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    assert cli.main(["predict", "--config", cfg, "--images", folder, "--top-k", "5",
                     "--output", str(tmp_path / "p.json")]) == 0
    expected = {r["image"]: r["top"] for r in json.loads((tmp_path / "p.json").read_text())}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "serve_onnx.py"), str(tmp_path / "m.onnx"),
                           *images], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "graph inputs" not in proc.stderr, proc.stderr
    served = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in served] == images
    for r in served:
        want = expected[r["image"]]
        assert [t["class"] for t in r["top"]] == [t["class"] for t in want]
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(r["top"], want)) <= 1e-4


def test_export_reads_the_runs_classes_when_model_classes_is_auto(tmp_path, pretrained):
    folder = make_photo_folder(tmp_path / "imgs", ["bee", "cow", "elk"], per_class=2)
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, model={"classes": "auto"},
                                                         data={"train": folder, "batch_size": 3},
                                                         train={"max_steps": 2}))
    run(load_config(cfg), LocalWorld())
    assert cli.main(["export", "--config", cfg, "--format", "mxnet", "--output", str(tmp_path / "e" / "net")]) == 0
    assert json.loads((tmp_path / "e" / "net-input.json").read_text())["classes"] == ["bee", "cow", "elk"]


def serve(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "serve_onnx.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_serve_onnx_explains_itself():
    proc = serve("--help")
    assert proc.returncode == 0 and "usage: serve_onnx.py" in proc.stdout and "--top-k" in proc.stdout
    assert "-input.json" in proc.stdout  # where it reads the preprocessing from


def test_serve_onnx_reports_an_unreadable_image_and_answers_the_others(trained_run, tmp_path):
    cfg, _ = trained_run
    folder = make_photo_folder(tmp_path / "imgs", ["a"], per_class=3)
    good = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.*g"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good[0], "rb").read()[:200])
    assert folder and cli.main(["export", "--config", cfg, "--format", "onnx", "--output",
                                str(tmp_path / "m.onnx")]) == 0
    images = [good[0], str(tmp_path / "broken.jpg"), good[1], str(truncated), str(tmp_path / "missing.jpg"), good[2]]
    proc = serve(tmp_path / "m.onnx", "--top-k", "2", *images)
    assert proc.returncode == 1, proc.stderr  # some images failed
    served = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in served] == images
    for r in served:
        failed = r["image"] not in good
        assert ("error" in r) == failed and ("top" in r) == (not failed), r
        if not failed:
            assert len(r["top"]) == 2
    assert "3 of 6 images could not be read" in proc.stderr
    everything_fine = serve(tmp_path / "m.onnx", *good)
    assert everything_fine.returncode == 0 and len(everything_fine.stdout.splitlines()) == 3


# --- a grid's other heads -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, pretrained):
    tmp = tmp_path_factory.mktemp("grid")
    cfg = write_config(tmp / "c.yaml", small_config(tmp, pretrained, data={"val_split": 0.2},
                                                    heads={"grid": {"optimizer.lr": [0.05, 0.5]}},
                                                    train={"max_steps": 3}))
    run(load_config(cfg), LocalWorld())
    return cfg, tmp / "out"


def test_export_takes_a_grid_head_by_name(grid_run, tmp_path):
    cfg, out = grid_run
    x = real_batch(out)
    logits = {}
    for head in ("h0", "h1"):
        path = tmp_path / head / "net"
        assert cli.main(["export", "--config", cfg, "--format", "mxnet", "--head", head, "--output", str(path)]) == 0
        block = mx.gluon.SymbolBlock.imports(f"{path}-symbol.json", ["data"], f"{path}-0000.params")
        logits[head] = block(mx.nd.array(x)).asnumpy()
        net = mx.gluon.model_zoo.vision.get_model("resnet18_v2", classes=5)
        net.load_parameters(str(out / "heads" / head / "model.params"))
        ref = net(mx.nd.array(x)).asnumpy()
        scale = max(1.0, float(np.abs(ref).max()))  # a few steps at a high lr: logits of 1e4 and more
        assert np.abs(logits[head] - ref).max() <= 1e-4 * scale
    assert np.abs(logits["h0"] - logits["h1"]).max() > 1e-2 * scale  # two heads, two networks


def test_predict_takes_a_grid_head_by_name(grid_run, tmp_path):
    """predict --head h1 answers as a run whose model.params is h1's."""
    cfg, out = grid_run
    folder = make_photo_folder(tmp_path / "imgs", ["a", "b"], per_class=3)
    as_h1 = tmp_path / "as-h1"
    shutil.copytree(out, as_h1)
    shutil.copy(out / "heads" / "h1" / "model.params", as_h1 / "model.params")
    answers = {}
    for name, args in (("h1", ["--head", "h1"]), ("h0", ["--head", "h0"]),
                       ("copy", ["--set", f"train.output={as_h1}"])):
        path = tmp_path / f"{name}.json"
        assert cli.main(["predict", "--config", cfg, *args, "--images", folder, "--output", str(path)]) == 0
        answers[name] = json.loads(path.read_text())
    assert answers["h1"] == answers["copy"] and answers["h1"] != answers["h0"]


@pytest.mark.parametrize("command", [["eval", "--data", "val", "--json", "e.json"],
                                     ["predict", "--images", "val", "--output", "p.json"],
                                     ["export", "--format", "onnx", "--output", "m.onnx"]])
def test_an_unknown_head_is_one_line_listing_the_heads(grid_run, trained_run, tmp_path, capsys, command):
    cfg, out = grid_run
    (tmp_path / "val" / "5").mkdir(parents=True)  # a class of the demo's digits
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "val" / "5" / "x.jpg")
    args = [a if a not in ("e.json", "val", "p.json", "m.onnx") else str(tmp_path / a) for a in command]
    assert cli.main([args[0], "--config", cfg, "--head", "h7", *args[1:]]) == 2
    assert capsys.readouterr().err.strip() == (f"distft: error: --head h7: no head of that name in {out / 'heads'} "
                                               "(the run's heads: h0, h1)")
    single, single_out = trained_run
    assert cli.main([args[0], "--config", single, "--head", "h1", *args[1:]]) == 2
    assert capsys.readouterr().err.strip() == (f"distft: error: --head h1: {single_out} has no heads (a heads.grid "
                                               "run writes heads/NAME/model.params)")
    assert [p.name for p in tmp_path.iterdir()] == ["val"]  # nothing written
