"""The decoder distft uses everywhere: immune to the order of imports and to what Horovod makes
global; a self-test that names the environment, not the user's files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from imagefiles import PHOTO_KINDS, photo_bytes

REPRO = r"""
import sys
import numpy as np
import mxnet
import horovod.mxnet  # loads its library RTLD_GLOBAL: libmxnet.so's jpeg_*/png_*/TIFF* become global
from distft.data.imaging import decode
for path in sys.argv[1:]:
    with open(path, "rb") as fh:
        img = decode(fh.read(), path)
    print(path, img.shape, int(img.mean()))
"""


def gradient(h=48, w=64):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("kind", PHOTO_KINDS)
def test_images_decode_after_horovod_made_mxnets_codecs_global(tmp_path, kind):
    """The minimal reproduction: `import mxnet; import horovod.mxnet`, then decode. Before the
    fix every JPEG failed with 'broken data stream when reading image file'."""
    path = tmp_path / f"img-{kind}.bin"
    path.write_bytes(photo_bytes(gradient(), kind))
    proc = subprocess.run([sys.executable, "-c", REPRO, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(48, 64, 3)" in proc.stdout  # upright, RGB (the EXIF-rotated file stores 64 x 48)


BROKEN_ORDER = r"""
import sys
import mxnet
import horovod.mxnet
from PIL import Image  # loaded after Horovod made MXNet's codecs global, without distft's care
from distft import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def jpeg_folder(root, n=4):
    from imagefiles import make_photo_folder

    return make_photo_folder(root, ["ant", "bee"], per_class=n, kinds=("baseline", "progressive"))


def test_a_broken_decoder_is_named_as_the_environment_and_caches_no_verdict(tmp_path):
    """A process whose Pillow bound MXNet's libjpeg stops before reading any file, with one line
    naming the library the codec symbols resolve to (not the user's files), exit 2; and no
    failure is cached, so a healthy process later reads every file as good."""
    from conftest import write_config

    train = jpeg_folder(tmp_path / "train")
    cfg = write_config(tmp_path / "c.yaml", {"data": {"train": train}})
    cache = tmp_path / "cache" / "check.json"
    proc = subprocess.run([sys.executable, "-c", BROKEN_ORDER, "check", "--config", cfg, "--cache", str(cache)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("distft: error: the image decoder fails its self-test in this process, so no image "
                           "file is at fault")
    assert "jpeg_read_header resolves globally to " in line and "libmxnet.so" in line and train not in line
    assert not cache.exists()
    from distft.config import load_config
    from distft.data.check import check

    [report] = check(load_config(cfg), jobs=1, cache_path=str(cache))
    assert report.unreadable == [] and report.read == 8


def test_failures_cached_by_an_earlier_distft_never_refuse_a_good_file(tmp_path):
    """Caches of the format before the decoder's identity was part of the key (version 1) may hold
    a broken process's verdicts ('300 unreadable files of 300'): they are ignored."""
    from distft.config import load_config
    from distft.data.check import check

    train = jpeg_folder(tmp_path / "train")
    files = sorted(str(p) for p in (tmp_path / "train").rglob("*.jpg"))
    cache = tmp_path / "check.json"
    poisoned = {p: [os.path.getsize(p), os.stat(p).st_mtime_ns, 0, 0,
                    f"{p}: cannot decode image (broken data stream when reading image file)"] for p in files}
    cache.write_text(json.dumps({"version": 1, "entries": poisoned}))
    (tmp_path / "check-rank0.json").write_text(json.dumps({"version": 1, "entries": poisoned}))
    [report] = check(load_config(None, [f"data.train={train}"]), jobs=1, cache_path=str(cache))
    assert report.unreadable == [] and report.read == len(files) == 8
    doc = json.loads(cache.read_text())
    assert doc["version"] == 2 and doc["decoder"].startswith("pillow-")


def test_self_test_accepts_this_environment_and_decodes_upright_rgb():
    from distft.data import imaging

    imaging.self_test()
    assert imaging.self_test_passed()
    img = imaging.decode(photo_bytes(gradient(), "exif-rotated"), "x")
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - gradient()).mean() < 3  # upright: the same picture, JPEG-rounded
