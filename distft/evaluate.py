"""Evaluation: the one code path behind a training run's `val_top1` and `distft eval`, so the
two agree exactly. Each rank scores a strided shard; the sums are allreduced once."""
from __future__ import annotations

import json
import os
from typing import Optional

import mxnet as mx
import numpy as np

from . import precision
from .agreement import agreed_everywhere
from .classes import map_validation
from .data import BatchLoader, eval_shard
from .errors import DataError


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(world, runner, loader: BatchLoader, batch_size: int, ctx, loss_fn, beat=lambda: None,
             classes: Optional[int] = None) -> dict:
    """Top-1/top-5/loss over `loader`'s data set. With `classes`, also the confusion matrix
    (`confusion[true, predicted]`, counts), allreduced with the same sums."""
    return evaluate_many(world, lambda x: [runner(x)], 1, loader, batch_size, ctx, loss_fn, beat, classes)[0]


def evaluate_many(world, forward, outputs: int, loader: BatchLoader, batch_size: int, ctx, loss_fn,
                  beat=lambda: None, classes: Optional[int] = None, top5: bool = True) -> list[dict]:
    """`evaluate` for `outputs` networks at once (the heads of a grid): `forward(x)` gives
    each one's logits from one pass over the shared part. One allreduce for all of them.
    `top5`: false for a model of 5 classes or fewer (it would always be 1): val_top5 is None."""
    idx = eval_shard(len(loader.dataset), world.size, world.rank)
    sums = np.zeros((outputs, 4))  # top1, top5, loss, count
    confusion = np.zeros((outputs, classes, classes)) if classes else None
    for start in range(0, len(idx), batch_size):
        beat()
        x, y = loader.batch(idx[start:start + batch_size], epoch=0)
        label = mx.nd.array(y, ctx=ctx)
        for k, out in enumerate(forward(mx.nd.array(x, ctx=ctx))):
            out = precision.to_float32(out)
            loss = loss_fn(out, label).asnumpy()
            logits = out.asnumpy()
            sums[k] += [topk_correct(logits, y, 1), topk_correct(logits, y, 5), loss.sum(), len(y)]
            if confusion is not None:
                np.add.at(confusion[k], (y, logits.argmax(axis=1)), 1)
    parts = [sums.ravel()] + ([confusion.ravel()] if confusion is not None else [])
    both = world.allreduce_numpy(np.concatenate(parts), "distft.eval")
    total = both[:sums.size].reshape(sums.shape)
    results = []
    for k in range(outputs):
        n = max(total[k, 3], 1)
        result = {"val_top1": total[k, 0] / n, "val_top5": total[k, 1] / n if top5 else None,
                  "val_loss": total[k, 2] / n,
                  "val_samples": int(total[k, 3])}
        if confusion is not None:
            result["confusion"] = both[sums.size:].reshape(confusion.shape)[k].astype(np.int64)
        results.append(result)
    return results


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
    from .data import open_dataset, open_training_sets
    from .datacheck import without_unreadable

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
    from mxnet import gluon

    from . import dist, imaging, trained

    if not (data or cfg.data.val or cfg.data.val_split):
        raise DataError("data.val: not set (nor data.val_split); give --data PATH (an ImageFolder or .rec)")
    world = world or dist.init_world(stall_timeout=cfg.train.stall_timeout)
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
