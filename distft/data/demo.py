"""The demo: real images that ship with scikit-learn (the 8x8 handwritten digits), written once as
JPEG files in ImageFolders, so that every demo run reads images the way a user's job does. A
backbone is pretrained on digits 0-4 (`demo-pretrain`), then a new head is fine-tuned on digits
5-9 (`demo`) with the backbone frozen. No downloads.

The folders live in distft's cache (`$DISTFT_CACHE_DIR`, default ~/.cache/distft, else a
folder of this user's under the system's temp dir): `demo-digits-v1/<set>/<train|val>/<digit>/`.
Ranks and nodes that write them at the same time each write a folder of their own and rename it
into place; the first rename wins and the others' copies are dropped.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile

import numpy as np

from distft.data import imaging
from distft.data.datasets import ImageFolder
from distft.errors import DataError

DEMO_SETS = ("demo", "demo-pretrain")
VAL_FRACTION = 0.2
JPEG_QUALITY = 95  # mean error about 1/255 on these digits
_LAYOUT = "demo-digits-v1"


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (n, 8, 8), 0..16 -> 0..255
    return gray, d.target.astype(np.int64)


def split(spec: str, role: str) -> np.ndarray:
    """The sample indices (of scikit-learn's digits) of a demo set's `train` or `val` part: a
    fixed split, the same for every run, rank and machine."""
    _, labels = _digits()
    digits = range(5, 10) if spec == "demo" else range(0, 5)
    chosen = np.flatnonzero(np.isin(labels, list(digits)))
    order = np.random.default_rng(20240607).permutation(chosen)
    n_val = int(round(len(order) * VAL_FRACTION))
    return np.sort(order[:n_val] if role == "val" else order[n_val:])


def _roots() -> list[str]:
    configured = os.environ.get("DISTFT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "distft")
    fallback = os.path.join(tempfile.gettempdir(), f"distft-{os.getuid()}")
    return [configured, fallback]


def _write(folder: str) -> None:
    """Every demo set as JPEG files under `folder`."""
    images, labels = _digits()
    for spec in DEMO_SETS:
        for role in ("train", "val"):
            for i in split(spec, role):
                where = os.path.join(folder, spec, role, str(labels[i]))
                os.makedirs(where, exist_ok=True)
                payload = imaging.encode_jpeg(np.repeat(images[i][:, :, None], 3, axis=2), JPEG_QUALITY)
                with open(os.path.join(where, f"{i:04d}.jpg"), "wb") as fh:
                    fh.write(payload)


def folders() -> str:
    """The folder holding every demo set, written now if it is not there yet."""
    errors = []
    for root in _roots():
        final = os.path.join(root, _LAYOUT)
        if os.path.isdir(final):
            return final
        tmp = f"{final}.tmp-{os.uname().nodename}-{os.getpid()}"
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            _write(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):  # not another writer's win: a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return final
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            errors.append(f"{root}: {exc.strerror or exc}")
    raise DataError(f"data.train: demo: cannot write the demo's JPEG files ({'; '.join(errors)}); "
                    "set DISTFT_CACHE_DIR to a writable folder")


def folder(spec: str, role: str) -> str:
    """The ImageFolder of demo set `spec` (`demo` or `demo-pretrain`), part `role` (`train`, or
    `val` for data.val)."""
    return os.path.join(folders(), spec, "val" if role == "val" else "train")


def dataset(spec: str, role: str) -> ImageFolder:
    return ImageFolder(folder(spec, role))
