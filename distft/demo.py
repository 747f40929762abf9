"""The demo: real images that ship with scikit-learn (the 8x8 handwritten digits, upscaled to
RGB). A backbone is pretrained on digits 0-4 (`demo-pretrain`), then a new head is fine-tuned on
digits 5-9 (`demo`) with the backbone frozen. No downloads."""
from __future__ import annotations

import functools

import numpy as np

from .data import ArrayImages

DEMO_SETS = ("demo", "demo-pretrain")
VAL_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (n, 8, 8), 0..16 -> 0..255
    return np.repeat(gray[:, :, :, None], 3, axis=3), d.target.astype(np.int64)


def dataset(spec: str, role: str) -> ArrayImages:
    images, labels = _digits()
    digits = range(5, 10) if spec == "demo" else range(0, 5)
    chosen = np.flatnonzero(np.isin(labels, list(digits)))
    # a fixed split, the same for every run and rank
    order = np.random.default_rng(20240607).permutation(chosen)
    n_val = int(round(len(order) * VAL_FRACTION))
    part = np.sort(order[:n_val] if role == "val" else order[n_val:])
    return ArrayImages(images[part], labels[part] - min(digits), name=f"{spec}:{role}",
                       class_names=[str(d) for d in digits])
