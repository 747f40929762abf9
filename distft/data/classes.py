"""Classes by name: data.train defines the class list (index = label); data.val is mapped onto it
by name; model.classes is resolved (`auto`) or checked against it; the names are saved with the
run (`classes.json`) so that predictions can be named.

ImageFolders and the demo sets carry class names. A RecordIO file carries numeric labels, and
names only when `<name>.classes.json` lies beside it (`distft make-rec` writes one).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from distft.data.datasets import read_names_file
from distft.errors import ConfigError, DataError
from distft.files import atomic_write_json
from distft.runfolder import RunFolder

def _listed(names, limit: int = 8) -> str:
    names = list(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _where(dataset) -> str:
    if getattr(dataset, "base", None) is not None:
        return _where(dataset.base)
    return getattr(dataset, "root", None) or getattr(dataset, "path", None) or getattr(dataset, "name", "?")


def counts(dataset) -> np.ndarray:
    """Samples per label."""
    n = len(dataset.class_names) if dataset.class_names is not None else dataset.classes
    return np.bincount(dataset.labels, minlength=n)


def training_classes(train_set, model_classes) -> tuple[Optional[list], int]:
    """(class names or None, number of classes for the head) from data.train and model.classes
    (an integer or `auto`)."""
    names = train_set.class_names
    if names is not None:
        per_class = counts(train_set)
        empty = [n for n, c in zip(names, per_class) if c == 0]
        if empty:
            raise DataError(f"data.train: {_where(train_set)}: class folders without images: {_listed(empty)} "
                            "(they would still take a label; remove them or add images)")
        top = int(train_set.labels.max()) if len(train_set.labels) else -1
        if top >= len(names):
            raise DataError(f"data.train: labels up to {top}, but its class names list only {len(names)}")
        if model_classes != "auto" and model_classes != len(names):
            raise ConfigError(f"model.classes: {model_classes}, but data.train has {len(names)} classes "
                              f"({_listed(names)}); set it to {len(names)} or auto")
        return list(names), len(names)
    top = int(train_set.labels.max()) if len(train_set.labels) else 0
    if model_classes == "auto":
        return None, top + 1
    if top >= model_classes:
        raise ConfigError(f"model.classes: {model_classes}, but data.train ({_where(train_set)}) has labels up "
                          f"to {top}; set it to at least {top + 1} or auto")
    return None, model_classes


def map_validation(val_set, train_names: Optional[list], classes: int, key: str = "data.val") -> None:
    """Relabel `val_set` in place so that its labels are data.train's labels for the same class
    names. Numeric labels (RecordIO without names) are checked against the head's size."""
    val_names = val_set.class_names
    if val_names is None or train_names is None:
        if val_names is not None and getattr(val_set, "root", None):
            # an ImageFolder's labels are sorted positions: meaningless without names to match
            raise DataError(f"{key}: {_where(val_set)} names its classes, but data.train has numeric labels "
                            "only; put <name>.classes.json beside the .rec (distft make-rec writes it)")
        top = int(val_set.labels.max()) if len(val_set.labels) else -1
        if top >= classes:
            raise DataError(f"{key}: {_where(val_set)} has labels up to {top}, but the model has {classes} "
                            f"classes (0 … {classes - 1})")
        return
    top = int(val_set.labels.max()) if len(val_set.labels) else -1
    if top >= len(val_names):
        raise DataError(f"{key}: labels up to {top}, but its class names list only {len(val_names)}")
    present = [n for n, c in zip(val_names, counts(val_set)) if c > 0]
    index = {n: i for i, n in enumerate(train_names)}
    unknown = [n for n in present if n not in index]
    if unknown:
        raise DataError(f"{key}: {_where(val_set)} has classes that data.train lacks: {_listed(unknown)} "
                        f"(data.train has {_listed(train_names)})")
    lookup = np.array([index.get(n, -1) for n in val_names], dtype=np.int64)
    val_set.labels = lookup[val_set.labels]
    val_set.class_names = list(train_names)
    val_set.classes = len(train_names)


def load(output: str) -> Optional[list]:
    """A run's class names (train.output/classes.json), or None when it saved none."""
    return read_names_file(RunFolder(output).classes, ConfigError, "unreadable", keyed=True, nonempty=True)


def save(output: str, names: Optional[list], classes: int) -> str:
    """train.output/classes.json: a JSON list, index = label (names of numbers when the data
    has none)."""
    path = RunFolder(output).classes
    atomic_write_json(path, names if names is not None else [str(i) for i in range(classes)], indent=0)
    return path
