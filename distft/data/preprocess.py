"""One definition of the input a trained network expects, saved with the run
(`train.output/preprocess.json`) and used by evaluation, prediction and export.

An image (any size, RGB) becomes the network's input by: resize the short side to
`resize_short` (bilinear), centre crop `crop` x `crop`, scale to [0, 1] (x / 255), subtract
`mean` and divide by `std` per channel (R, G, B), and lay out as NCHW float32. That is what
`data.Transform` does for validation and un-augmented training. `decode` says how: with
`transforms.DECODE_POLICY` the centre square is resized to the crop in one resample (Pillow's,
box = the square; area averaging where it shrinks, bilinear where it grows), a JPEG decoded at
the largest DCT scale-down (1/8, 1/4, 1/2) that leaves the square at least `crop` pixels wide;
"full" (runs that predate it): no DCT scaling, bilinear.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from distft.data.transforms import DECODE_POLICY, FULL_DECODE, Transform
from distft.errors import ConfigError
from distft.files import atomic_write_json
from distft.runfolder import PREPROCESS_FILE, RunFolder

AREA_OR_BILINEAR = "area (box) shrinking, bilinear enlarging"


@dataclass(frozen=True)
class Preprocess:
    resize_short: int
    crop: int
    mean: tuple  # per channel, on the [0, 1] scale
    std: tuple
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    interpolation: str = "bilinear"
    decode: str = FULL_DECODE  # a run's saved file without the key predates DECODE_POLICY

    @classmethod
    def from_config(cls, cfg) -> "Preprocess":
        size = cfg.model.image_size
        return cls(resize_short=size, crop=size, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                   interpolation=AREA_OR_BILINEAR, decode=DECODE_POLICY)

    def transform(self):
        """The evaluation transform (`transforms.Transform`) this describes."""
        if self.resize_short != self.crop or self.channel_order != "RGB" or self.layout != "NCHW":
            raise ConfigError(f"{PREPROCESS_FILE}: distft reads RGB, NCHW, short side resized to the crop size; "
                              f"got {self.channel_order}, {self.layout}, {self.resize_short} -> {self.crop}")
        if self.decode not in (DECODE_POLICY, FULL_DECODE):
            raise ConfigError(f"{PREPROCESS_FILE}: decode: {self.decode!r} is not one distft knows "
                              f"({DECODE_POLICY!r} or 'full')")
        return Transform(self.crop, self.mean, self.std, augment=False, seed=0, decode=self.decode)

    def input_shape(self, batch: int = 1) -> tuple:
        return (batch, 3, self.crop, self.crop)

    def spec_lines(self) -> list[str]:
        """What a server must do to an image before handing it to the exported graph."""
        return [
            f"input: float32 {self.layout} {self.input_shape()} (any batch size), channels {self.channel_order}",
            f"preprocess: resize short side to {self.resize_short} ({self.interpolation}), "
            f"centre crop {self.crop}x{self.crop}, x/255, (x - mean) / std",
            f"decode: {self.decode}",
            f"mean: {list(self.mean)}",
            f"std: {list(self.std)}",
        ]

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["mean"], doc["std"] = list(self.mean), list(self.std)
        return doc

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_json(), indent=1)

    @classmethod
    def load(cls, path: str) -> "Preprocess":
        try:
            with open(path) as fh:
                doc = json.load(fh)
            doc["mean"], doc["std"] = tuple(doc["mean"]), tuple(doc["std"])
            return cls(**doc)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{path}: not a distft preprocessing file ({exc})") from None


def for_run(cfg) -> Preprocess:
    """The run's saved preprocessing when it has one (what the network was trained with), else
    the one the config describes."""
    path = RunFolder(cfg.train.output).preprocess
    return Preprocess.load(path) if os.path.isfile(path) else Preprocess.from_config(cfg)
