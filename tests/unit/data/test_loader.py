"""The input pipeline: JPEGs decoded at the DCT scale the crop allows, the same pixels wherever
and whenever a sample is read, and one decoding policy for training, eval, predict and serving."""
import importlib.util
import io
import json
import os
import tempfile

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from distft.components.state import Batching
from distft.config import load_config
from distft.data import preprocess
from distft.data.datasets import ImageFolder
from distft.data.imaging import Encoded, dct_scale, decode
from distft.data.loader import BatchLoader
from distft.data.transforms import DECODE_POLICY, Transform
from distft.distributed.world import LocalWorld
from distft.errors import DataError
from distft.inference import predict
from distft.train import builders

from imagefiles import make_photo_folder, png

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SERVING_TOLERANCE = 1e-5  # serve_onnx.py's input against distft's, after normalisation (float32 rounding)


def smooth_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients and mild noise: what a camera sees, not pure noise (which no scale-down keeps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([120 + 100 * np.sin(xx / 37.0 + c) * np.cos(yy / 29.0 - c) for c in range(3)], axis=2)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def test_the_dct_scale_is_the_largest_that_leaves_the_crop_at_the_input_size():
    assert dct_scale(375, 375, 224) == 1  # an ImageNet-sized photo: whole
    assert dct_scale(447, 600, 224) == 1 and dct_scale(448, 600, 224) == 2
    assert dct_scale(3000, 3000, 224) == 8  # a 12 MP photo's centre square: 1/8 is still 375 px
    assert dct_scale(1000, 2000, 224) == 4  # the short side of the crop decides


def test_a_large_jpeg_is_decoded_scaled_down_and_stays_close_to_a_full_decode():
    photo = Encoded(jpeg(smooth_photo(600, 800)), "photo.jpg")
    scaled = Transform(64, MEAN, STD, augment=False, seed=0)
    whole = Transform(64, MEAN, STD, augment=False, seed=0, decode="full")
    a, b = scaled(photo, 0, 0), whole(photo, 0, 0)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == np.float32
    assert not np.array_equal(a, b)  # 600 px / 8 >= 64: decoded at 1/8, not whole
    levels = np.abs(a - b).mean() * 0.226 * 255  # in grey levels (std ~0.226 x 255)
    shifted = np.abs(a - scaled(Encoded(jpeg(np.ascontiguousarray(smooth_photo(600, 800)[::-1])), "upside-down.jpg"), 0, 0)).mean() * 0.226 * 255
    assert levels < 4 and levels < shifted / 3  # the same picture, not just the same size


def test_a_png_decoded_here_gives_what_its_pixels_give():
    img = smooth_photo(50, 70)
    t = Transform(16, MEAN, STD, augment=True, seed=4)
    for epoch in range(3):
        assert np.array_equal(t(Encoded(png(img), "x.png"), epoch, 9), t(img, epoch, 9))


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_as_the_whole_image_decoder_does():
    wide = (np.linspace(0, 65535, 40 * 60).reshape(40, 60)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")  # mode I;16
    t = Transform(16, MEAN, STD, augment=False, seed=0)
    whole = decode(buf.getvalue(), "grey16.png")
    assert whole.max() == 255  # scaled, not clipped to white
    assert np.array_equal(t(Encoded(buf.getvalue(), "grey16.png"), 0, 0), t(whole, 0, 0))


def test_a_sample_has_the_same_pixels_whatever_the_batch_workers_or_order(tmp_path):
    """World size changes how samples are batched and which rank reads them; resume starts
    mid-epoch; the feature cache stores what the first epoch read: none may change pixels."""
    root = tmp_path / "photos"
    for i in range(8):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.jpg").write_bytes(jpeg(smooth_photo(300 + 20 * i, 420, seed=i)))
    ds = ImageFolder(str(root))
    t = Transform(32, MEAN, STD, augment=True, seed=7)
    one_rank = BatchLoader(ds, t, workers=0).batch(np.arange(8), epoch=2)[0]
    two_ranks = [BatchLoader(ds, t, workers=2).batch(np.array(idx), epoch=2)[0] for idx in ([6, 0, 2, 4], [1, 3, 5, 7])]
    by_index = {i: x for idx, xs in zip(([6, 0, 2, 4], [1, 3, 5, 7]), two_ranks) for i, x in zip(idx, xs)}
    for i in range(8):
        assert np.array_equal(one_rank[i], by_index[i])
    assert not np.array_equal(one_rank, BatchLoader(ds, t, workers=1).batch(np.arange(8), epoch=3)[0])


def test_a_corrupt_jpeg_is_one_line_naming_the_file(tmp_path):
    good = jpeg(smooth_photo(400, 500))
    path = tmp_path / "c" / "broken.jpg"
    path.parent.mkdir()
    path.write_bytes(good[:len(good) // 3])
    ds = ImageFolder(str(tmp_path))
    for policy in (DECODE_POLICY, "full"):
        with pytest.raises(DataError) as err:
            Transform(32, MEAN, STD, augment=True, seed=0, decode=policy)(ds.encoded(0), 0, 0)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"broken.jpg: not an image"):
        Transform(32, MEAN, STD, augment=False, seed=0)(ds.encoded(0), 0, 0)


def serve_onnx():
    spec = importlib.util.spec_from_file_location("serve_onnx", os.path.join(ROOT, "launch", "serve_onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_eval_predict_and_serving_give_the_same_tensor(tmp_path):
    """One image, four paths: training's validation loader (builders.build_data), `eval`'s
    (the run's preprocess.json), `predict`'s, and launch/serve_onnx.py's (Pillow and numpy,
    no distft). Photos of every kind (EXIF-rotated, CMYK, greyscale, progressive, PNG), big
    enough that JPEGs are decoded at 1/8 and 1/4."""
    folder = make_photo_folder(tmp_path / "photos", ["a", "b"], per_class=6, sizes=((270, 400), (380, 150)))
    cfg = load_config(None, [f"data.train={folder}", f"data.val={folder}", "model.image_size=32",
                             f"train.output={tmp_path / 'run'}", "data.workers=2"])
    world = LocalWorld()
    sets = builders.open_data(cfg, world, warn=print)
    data = builders.build_data(cfg, world, Batching(4, 1, 4, 4, 1), sets)
    prep = preprocess.Preprocess.from_config(cfg)
    os.makedirs(cfg.train.output)
    prep.save(os.path.join(cfg.train.output, "preprocess.json"))
    saved = preprocess.for_run(cfg)
    assert saved.decode == DECODE_POLICY
    serving = serve_onnx()
    n = len(sets.val)
    training = data.val_loader.batch(np.arange(n), epoch=0)[0]
    evaluating = BatchLoader(sets.val, saved.transform(), workers=2).batch(np.arange(n), epoch=0)[0]
    for i, path in enumerate(sets.val.files):
        predicting = predict.load_image(path, saved.transform())
        served = serving.preprocess(path, saved.to_json())
        assert np.array_equal(training[i], evaluating[i]) and np.array_equal(training[i], predicting), path
        assert np.abs(served - predicting).max() <= SERVING_TOLERANCE, path
    data.close()


def test_bench_data_only_writes_the_fixed_json_shape(tmp_path, capsys, monkeypatch):
    """`distft bench --data-only`: the job's loader and MXNet's ImageRecordIter (through a
    temporary .rec of the folder) on the same images; tools read exactly this JSON."""
    from distft import cli

    folder = make_photo_folder(tmp_path / "photos", ["a", "b"], per_class=5, sizes=((90, 120), (130, 70)),
                               kinds=("baseline", "progressive", "exif-rotated"))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: {{image_size: 32}}\ndata: {{train: {folder}, augment: true, batch_size: 4}}\n")
    out = tmp_path / "out.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert cli.main(["bench", "--data-only", "--config", str(cfg), "--threads", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc) == ["data_only"]
    d = doc["data_only"]
    assert list(d) == ["threads", "images", "image_size", "samples_per_sec"]
    assert (d["threads"], d["images"], d["image_size"]) == (2, 10, 32)
    assert list(d["samples_per_sec"]) == ["distft", "recorditer"] and min(d["samples_per_sec"].values()) > 0
    assert "distft / recorditer" in capsys.readouterr().out
    assert not list(scratch.iterdir())  # the temporary .rec is gone
