"""A job's data sets: opening data.train and data.val by what they name (a folder, a .rec file,
the demo), data.val_split's hold-out, the classes they define, and the digest that says a
relaunch sees the same data.train."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from distft.data import classes, demo
from distft.data.datasets import ImageFolder, RecordFile, Subset
from distft.errors import DataError

_HOLDOUT = 0x7A1  # a seed stream of its own for data.val_split (positions: checkpoints before ids)


def held_out(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which samples data.val_split holds out, as a boolean mask: sample `id` is held out when a
    seeded hash of its name falls below `fraction`. A file's side depends on its own name
    alone, so files added or removed between launches never move a trained-on sample into
    validation or back (and the same file is held out by every run with this seed). At least
    one sample is on each side."""
    draws = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
                      for i in ids], dtype=np.float64) / 2.0 ** 64
    mask = draws < fraction
    if not mask.any():
        mask[int(np.argmin(draws))] = True
    if mask.all():
        mask[int(np.argmax(draws))] = False
    return mask


def split_holdout(dataset, fraction: float, seed: int, by_position: bool = False) -> tuple[Subset, Subset]:
    """(training part, held-out part) of `dataset`, the same on every rank and launch.
    `by_position`: the split of checkpoints written before samples had names (a seeded
    permutation of positions, round(n x fraction) held out), kept for their resumes."""
    n = len(dataset)
    if n < 2:
        raise DataError(f"data.val_split: data.train has {n} sample(s); nothing to hold out")
    if by_position:
        n_val = min(max(1, int(round(n * fraction))), n - 1)
        order = np.random.default_rng([seed, _HOLDOUT]).permutation(n)
        train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    else:
        mask = held_out(dataset.ids, fraction, seed)
        train, val = np.flatnonzero(~mask), np.flatnonzero(mask)
    return Subset(dataset, train, "train"), Subset(dataset, val, "val_split")


def data_digest(dataset) -> dict:
    """What makes data.train the same data set at a relaunch: every file's (or record's) name
    and size, and the class names. {"digest", "files"}."""
    base = dataset.base if isinstance(dataset, Subset) else dataset
    h = hashlib.sha256(json.dumps(getattr(base, "class_names", None)).encode())
    entries = base.identity()
    for ident, size in entries:
        h.update(f"{ident}\0{size}\n".encode())
    return {"digest": h.hexdigest()[:32], "files": len(entries)}


def open_dataset(spec: str, role: str, key: str):
    """`spec` is a directory (ImageFolder), a .rec file, `demo` or `demo-pretrain`."""
    if spec in demo.DEMO_SETS:
        return demo.dataset(spec, role)
    if spec.endswith(".rec"):
        return RecordFile(spec)
    if os.path.isdir(spec):
        return ImageFolder(spec)
    if not os.path.exists(spec):
        raise DataError(f"{key}: {spec}: no such file or directory")
    raise DataError(f"{key}: {spec}: expected an ImageFolder directory, a .rec file or 'demo'")


def open_training_sets(data_cfg, model_classes, holdout_by_position: bool = False):
    """(train set, val set or None, class names or None, number of classes) for a job: the
    training set defines the classes, data.val is mapped onto them by name, data.val_split
    holds a seeded share of data.train out of training (`split_holdout`)."""
    train = open_dataset(data_cfg.train, "train", "data.train")
    names, num_classes = classes.training_classes(train, model_classes)
    val = None
    if data_cfg.val_split:
        train, val = split_holdout(train, data_cfg.val_split, data_cfg.seed, by_position=holdout_by_position)
    elif data_cfg.val:
        val = open_dataset(data_cfg.val, "val", "data.val")
        classes.map_validation(val, names, num_classes)
    return train, val, names, num_classes


def resolve_model_classes(cfg) -> int:
    """Set `model.classes: auto` to data.train's number of classes (and check an explicit one),
    for commands that build the model without training (plan, the benchmark's baseline)."""
    _, cfg.model.classes = classes.training_classes(open_dataset(cfg.data.train, "train", "data.train"),
                                                    cfg.model.classes)
    return cfg.model.classes


