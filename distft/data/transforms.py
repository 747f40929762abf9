"""The transform from a decoded image to the network's input."""
from __future__ import annotations

import numpy as np

from distft.data.imaging import Image


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape[0] == h and img.shape[1] == w:
        return img
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BILINEAR))


class Transform:
    """uint8 HWC image -> normalised float32 CHW of size image_size.

    Evaluation and un-augmented training: resize the short side, centre crop. Augmented
    training: random resized crop and horizontal flip, drawn from a generator seeded by
    (seed, epoch, sample index), so the result depends neither on world size nor on resume."""

    def __init__(self, image_size: int, mean, std, augment: bool, seed: int):
        self.size = image_size
        self.mean = np.array(mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.std = np.array(std, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.augment = augment
        self.seed = seed

    def __call__(self, img: np.ndarray, epoch: int, index: int) -> np.ndarray:
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        s = self.size
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            h, w = img.shape[:2]
            area = h * w * rng.uniform(0.5, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch = int(min(h, max(1, round(np.sqrt(area / ratio)))))
            cw = int(min(w, max(1, round(np.sqrt(area * ratio)))))
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            img = _resize(img[y0:y0 + ch, x0:x0 + cw], s, s)
            if rng.random() < 0.5:
                img = img[:, ::-1]
        else:
            h, w = img.shape[:2]
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            img = _resize(img, nh, nw)
            y0, x0 = (nh - s) // 2, (nw - s) // 2
            img = img[y0:y0 + s, x0:x0 + s]
        chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
        return (chw - self.mean) / self.std


