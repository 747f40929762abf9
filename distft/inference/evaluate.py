"""`distft eval`: the trained network of a run on a data set (default: the run's own validation
data), scored by training's own validation code (`components/validation.py`): top-1, top-5,
loss, per-class precision and recall, and the confusion matrix (JSON and a PNG)."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from mxnet import gluon

from distft.components.validation import evaluate
from distft.data import imaging
from distft.data.check import without_unreadable
from distft.data.classes import map_validation
from distft.data.loader import BatchLoader
from distft.data.sets import open_dataset, open_training_sets
from distft.distributed.agreement import agreed_everywhere
from distft.distributed.world import init_world
from distft.errors import DataError
from distft.inference import trained


def per_class(confusion: np.ndarray, names: list[str]) -> dict:
    """name -> precision (of predictions of it, null when never predicted), recall (null when
    it has no samples) and count (its samples)."""
    out = {}
    for i, name in enumerate(names):
        count = int(confusion[i].sum())
        predicted = int(confusion[:, i].sum())
        hit = int(confusion[i, i])
        out[name] = {"precision": hit / predicted if predicted else None,
                     "recall": hit / count if count else None, "count": count}
    return out


def plot_confusion(confusion: np.ndarray, names: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)
    side = min(max(4.0, 0.35 * k + 2.0), 30.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(confusion, cmap="Blues")
    if k <= 60:  # beyond that the tick labels would be unreadable anyway
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        if k <= 20:
            high = confusion.max() / 2 if confusion.size else 0
            for (i, j), v in np.ndenumerate(confusion):
                ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > high else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def eval_set(cfg, data: Optional[str], names: list[str], world):
    """(data set, what it is, its key) that `distft eval` scores: --data, else the run's own
    validation data (data.val, or data.val_split's hold-out of data.train), its classes matched
    to the run's by name and its unreadable files left out exactly as training's validation
    leaves them out (data.max_bad_fraction / data.max_bad_files)."""
    if data or cfg.data.val:
        key, spec = ("--data", data) if data else ("data.val", cfg.data.val)
        dataset = open_dataset(spec, "val", key)
        map_validation(dataset, names, len(names), key)  # by name, as training's validation does
    elif cfg.data.val_split:
        key, spec = "data.val_split", f"{cfg.data.train} (data.val_split {cfg.data.val_split:g})"
        _, dataset, _, _ = open_training_sets(cfg.data, len(names))
    else:
        raise DataError("data.val: not set (nor data.val_split); give --data PATH (an ImageFolder or .rec)")
    return without_unreadable(dataset, key, world, cfg.data), spec, key


def run(cfg, json_path: str, data: Optional[str] = None, checkpoint_dir: Optional[str] = None,
        head: Optional[str] = None, world=None) -> dict:
    """`distft eval`: the trained network of `cfg`'s run on `data` (default: the run's own
    validation data, data.val or data.val_split)."""
    if not (data or cfg.data.val or cfg.data.val_split):
        raise DataError("data.val: not set (nor data.val_split); give --data PATH (an ImageFolder or .rec)")
    world = world or init_world(stall_timeout=cfg.train.stall_timeout)
    agreed_everywhere(world, "testing the image decoder", imaging.self_test)
    ctx = world.context()
    names = trained.run_classes(cfg)  # the run's classes (classes.json), model.classes: auto or not
    classes = len(names)
    net, source = trained.load_network(cfg, ctx, checkpoint_dir, head)
    dataset, spec, _ = eval_set(cfg, data, names, world)
    runner = trained.runner(cfg, net, ctx)
    loader = BatchLoader(dataset, trained.preprocessing(cfg).transform(), workers=cfg.data.workers,
                         max_bad_fraction=cfg.data.max_bad_fraction, max_bad_files=cfg.data.max_bad_files)
    try:
        result = evaluate(world, runner, loader, cfg.data.val_batch_size or cfg.data.batch_size, ctx,
                          gluon.loss.SoftmaxCrossEntropyLoss(), classes=classes)
    finally:
        loader.close()
    confusion = result.pop("confusion")
    report = {
        "model": source, "data": spec, "samples": result["val_samples"],
        "top1": result["val_top1"], "top5": result["val_top5"] if classes > 5 else None,
        "loss": result["val_loss"], "world_size": world.size,
        "classes": names, "per_class": per_class(confusion, names),
        "confusion": confusion.tolist(), "bad_samples": loader.bad,
    }
    if world.rank == 0:
        directory = os.path.dirname(os.path.abspath(json_path))
        os.makedirs(directory, exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1)
        png = os.path.splitext(json_path)[0] + ".png"
        plot_confusion(confusion, names, png, f"{os.path.basename(spec.split(' (')[0].rstrip('/'))}: "
                                              f"top-1 {report['top1']:.3f}")
        top5 = "n/a" if report["top5"] is None else f"{report['top5']:.4f}"
        print(f"eval: {report['samples']} samples of {spec}, top-1 {report['top1']:.4f}, top-5 {top5}; "
              f"wrote {json_path} and {png}", flush=True)
    return report
