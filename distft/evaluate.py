"""Evaluation: top-1/top-5 and loss over a data set, each rank its strided shard, summed over
ranks. One code path for validation during training and for later evaluation."""
from __future__ import annotations

import mxnet as mx
import numpy as np

from . import precision
from .data import BatchLoader, eval_shard


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(world, runner, loader: BatchLoader, batch_size: int, ctx, loss_fn, beat=lambda: None) -> dict:
    idx = eval_shard(len(loader.dataset), world.size, world.rank)
    sums = np.zeros(4)  # top1, top5, loss, count
    for start in range(0, len(idx), batch_size):
        beat()
        x, y = loader.batch(idx[start:start + batch_size], epoch=0)
        out = precision.to_float32(runner(mx.nd.array(x, ctx=ctx)))
        loss = loss_fn(out, mx.nd.array(y, ctx=ctx)).asnumpy()
        logits = out.asnumpy()
        sums += [topk_correct(logits, y, 1), topk_correct(logits, y, 5), loss.sum(), len(y)]
    total = world.allreduce_numpy(sums, "distft.eval")
    n = max(total[3], 1)
    return {"val_top1": total[0] / n, "val_top5": total[1] / n, "val_loss": total[2] / n,
            "val_samples": int(total[3])}
