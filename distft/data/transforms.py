"""The transform from an image to the network's input: the one decoding policy of training,
validation, `eval`, `predict` and export (`preprocess.json`, which `launch/serve_onnx.py` reads).

A sample is either encoded bytes (`Encoded`: decoded here, a JPEG at the DCT scale the crop
allows) or an already decoded (H, W, 3) uint8 array. Either way the crop box is chosen in the
upright image's own pixel coordinates, resized to the input size in one resample (Pillow's;
area averaging where it shrinks, bilinear where it grows), and converted to float once at the end."""
from __future__ import annotations

import math
import random
from typing import Optional, Union

import numpy as np

from distft.data.imaging import Encoded, Image, decode_crop, resampling

DECODE_POLICY = "crop-box-area/jpeg-dct-scaled"  # what preprocess.json calls this transform's decoding
FULL_DECODE = "full"  # runs before it: the whole JPEG decoded, bilinear


def centre_box(w: int, h: int) -> tuple:
    """Resize the short side to the crop size, centre crop: the centre square of the image."""
    m = min(w, h)
    return ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)


class Transform:
    """An image -> normalised float32 CHW of size image_size.

    Evaluation and un-augmented training: resize the short side, centre crop. Augmented
    training: random resized crop (0.5 to 1 of the area, aspect 3/4 to 4/3) and horizontal flip,
    drawn from a generator seeded by (seed, epoch, sample index) in the upright image's pixel
    coordinates, so the result depends neither on world size nor on resume (nor on the DCT
    scale the decoder used). `decode`: DECODE_POLICY (JPEGs decoded at a reduced DCT scale where the
    crop allows, area averaging where the crop shrinks) or FULL_DECODE."""

    def __init__(self, image_size: int, mean, std, augment: bool, seed: int, decode: str = DECODE_POLICY):
        self.size = image_size
        self.mean = np.array(mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.std = np.array(std, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.augment = augment
        self.seed = seed
        self.scaled = decode == DECODE_POLICY

    def box(self, w: int, h: int, epoch: int, index: int) -> tuple[tuple, bool]:
        """(crop box (x0, y0, x1, y1) in a w x h image, flip left-right?)."""
        if not self.augment:
            return centre_box(w, h), False
        # Python's Mersenne Twister seeded with one integer of (seed, epoch, index): the same draws
        # on every platform and version, at a tenth of the cost of a numpy Generator per sample
        u = random.Random((self.seed * 1_000_003 + epoch) * 4_294_967_311 + index).random
        area = h * w * (0.5 + 0.5 * u())
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * u())
        ch = int(min(h, max(1, round(math.sqrt(area / ratio)))))
        cw = int(min(w, max(1, round(math.sqrt(area * ratio)))))
        y0 = int(u() * (h - ch + 1))
        x0 = int(u() * (w - cw + 1))
        return (x0, y0, x0 + cw, y0 + ch), u() < 0.5

    def pixels(self, image: Union[Encoded, np.ndarray], epoch: int, index: int):
        """The crop, resized and flipped: a (size, size) RGB Pillow image."""
        def choose(w, h):
            return self.box(w, h, epoch, index)

        if isinstance(image, Encoded):
            return decode_crop(image.payload, image.where, self.size, choose, self.scaled)
        img = np.asarray(image)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        box, flip = choose(img.shape[1], img.shape[0])
        out = Image.fromarray(np.ascontiguousarray(img)).resize((self.size, self.size), resampling(box, self.size, self.scaled), box=box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out

    def __call__(self, image: Union[Encoded, np.ndarray], epoch: int, index: int,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
        """The network's input; written into `out` (a (3, size, size) float32 view, e.g. a row of
        the batch) when given: no float image per sample, no copy into the batch."""
        if out is None:
            out = np.empty((3, self.size, self.size), np.float32)
        for c, band in enumerate(self.pixels(image, epoch, index).split()):  # R, G, B planes, contiguous
            np.copyto(out[c], np.asarray(band), casting="unsafe")  # uint8 -> float32: exact, the one conversion
        out -= self.mean
        out /= self.std
        return out
