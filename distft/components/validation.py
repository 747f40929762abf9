"""Validation: the one code path behind a training run's `val_top1` and `distft eval`, so the
two agree exactly. Each rank scores a strided shard; the sums are allreduced once."""
from __future__ import annotations

from typing import Optional

import mxnet as mx
import numpy as np

from distft import precision
from distft.data.loader import BatchLoader
from distft.data.sharding import eval_shard


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
