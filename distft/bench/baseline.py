"""What distft is measured against: a fine-tuning loop written the way Horovod's own MXNet
examples write one. Every parameter is broadcast (hvd.broadcast_parameters), DistributedTrainer
runs over all parameters with the frozen ones at grad_req='null', BatchNorm is left as built,
the whole network is hybridized and recorded. Only the data path is shared with distft, so both
see the same batches. Kept plain on purpose: do not optimise it.

    horovodrun -np 2 python -m distft.bench.baseline --config X --mode train|limit --out result.json
`limit` runs forward-only inference of the same network at the same batch.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import resource

import mxnet as mx
import numpy as np
import psutil
from mxnet import autograd, gluon

from distft.config import load_config
from distft.data.loader import BatchLoader
from distft.data.sets import open_dataset, resolve_model_classes
from distft.data.sharding import ShardSampler
from distft.data.transforms import Transform
from distft.distributed.world import horovod
from distft.models.freeze import is_under
from distft.models.gluon import structural_params


def _arguments(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--mode", choices=("train", "limit"), default="train")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def _model(cfg, ctx):
    """The model as a user of plain Horovod sets it up: the zoo's network, the pretrained weights
    for everything but the new head, grad_req = 'null' outside the trainable blocks."""
    net = gluon.model_zoo.vision.get_model(cfg.model.name, classes=cfg.model.classes)
    # pretrained weights for everything but the new head, as a user would load them
    if isinstance(cfg.model.pretrained, str):
        weights = {k: v for k, v in mx.nd.load(cfg.model.pretrained).items() if not k.startswith("output.")}
        with tempfile.TemporaryDirectory() as tmp:
            mx.nd.save(os.path.join(tmp, "w.params"), weights)
            net.load_parameters(os.path.join(tmp, "w.params"), ctx=ctx, allow_missing=True)
    net.output.initialize(mx.init.Xavier(), ctx=ctx, force_reinit=True)
    net.collect_params().initialize(mx.init.Xavier(), ctx=ctx)  # anything left (no-op otherwise)
    # the usual freezing: grad_req = 'null' outside the trainable blocks
    trainable = cfg.freeze.trainable
    for name, param in structural_params(net).items():
        if not any(is_under(name, t) for t in trainable) and param.grad_req != "null":
            param.grad_req = "null"
    return net


def main(argv=None) -> int:
    args = _arguments(argv)
    hvd = horovod()
    started = psutil.Process().create_time()
    cfg = load_config(args.config, args.overrides)
    resolve_model_classes(cfg)
    hvd.init()
    ctx = mx.gpu(hvd.local_rank()) if mx.context.num_gpus() else mx.cpu()
    net = _model(cfg, ctx)
    params = net.collect_params()
    hvd.broadcast_parameters(params, root_rank=0)  # deferred ones are sent at their first forward
    net.hybridize(static_alloc=True, static_shape=True)
    if args.mode == "train":
        opt = {"learning_rate": cfg.optimizer.lr, "wd": cfg.optimizer.weight_decay, "momentum": cfg.optimizer.momentum}
        trainer = hvd.DistributedTrainer(params, "sgd", opt)
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    data = open_dataset(cfg.data.train, "train", "data.train")
    sampler = ShardSampler(len(data), cfg.data.batch_size, hvd.size(), hvd.rank(), cfg.data.seed)
    loader = BatchLoader(data, Transform(cfg.model.image_size, cfg.data.mean, cfg.data.std, False, cfg.data.seed),
                         workers=cfg.data.workers, max_bad_fraction=cfg.data.max_bad_fraction,
                         max_bad_files=cfg.data.max_bad_files)
    batch = cfg.data.batch_size
    rates, window_start, first_step = [], None, None
    for i in range(args.steps):
        epoch, step = divmod(i, sampler.steps_per_epoch)
        x, y = loader.batch(sampler.indices(epoch, step), epoch)
        x, y = mx.nd.array(x, ctx=ctx), mx.nd.array(y, ctx=ctx)
        if args.mode == "train":
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(batch)
            loss.mean().asscalar()
        else:
            net(x).wait_to_read()
        if first_step is None:
            first_step = time.time()
            window_start = time.perf_counter()
            continue  # the first step builds graphs: not timed
        if i % args.window == 0:
            now = time.perf_counter()
            rates.append(batch * args.window / (now - window_start))
            window_start = now
    job = [float(hvd.allreduce(mx.nd.array([r]), average=False, name=f"rate{k}").asscalar())
           for k, r in enumerate(rates)]
    # every parameter's bytes, counted now that the first forward has given each its shape
    bytes_broadcast = sum(int(np.prod(q.shape)) * np.dtype(q.dtype).itemsize for q in params.values())
    rss = hvd.allgather(mx.nd.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0],
                                    dtype=np.float64)).asnumpy().astype(int).tolist()
    if hvd.rank() == 0:
        with open(args.out, "w") as fh:
            json.dump({"mode": args.mode, "world_size": hvd.size(), "window_samples_per_sec": job,
                       "samples_per_sec": float(np.median(job[1:] if len(job) > 2 else job)),
                       "peak_rss_bytes": rss, "bytes_broadcast": bytes_broadcast,
                       "seconds_to_first_step": first_step - started}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
