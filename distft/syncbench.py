"""The floor of a synchronized BatchNorm on this machine, for `distft bench`.

Run under horovodrun (every rank takes part):

    horovodrun -np 2 python -m distft.syncbench --channels 512 --spatial 4 --batches 8,32 --out r.json

- `exchange_us`: one statistics exchange as SyncBatchNorm sends it (2C+1 float64, one stable
  name), enqueued and waited for: the latency a layer's forward or backward cannot hide inside
  the layer. `exchange_fresh_names_us`: the same with a new name per call (what distft did
  before names were stable: Horovod's response cache never hits).
- `layer_us[batch]`: one BatchNorm layer, forward + backward of a (batch, C, S, S) input, waited
  for: MXNet's BatchNorm (hybridized, as `dist.batchnorm: local` runs it) against ours
  synchronized across the ranks.
Every figure is the median of its repeats; the variants are interleaved, so that a slow spell of
a shared machine hits them alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import mxnet as mx
from mxnet import autograd
from mxnet.gluon import nn


def _median_us(samples: list) -> float:
    return statistics.median(samples) * 1e6


def _layer(channels: int, world, sync: bool):
    from . import syncbn

    net = nn.HybridSequential()
    net.add(nn.BatchNorm(in_channels=channels))
    net.initialize()
    if sync:
        syncbn.convert(net, ["0"], world)
    else:
        net.hybridize(static_alloc=True, static_shape=True)
    return net


def _fwd_bwd(net, x, w) -> float:
    start = time.perf_counter()
    with autograd.record():
        loss = (net(x) * w).sum()
    loss.backward()
    x.grad.wait_to_read()
    net[0].gamma.grad().wait_to_read()
    return time.perf_counter() - start


def measure(world, channels: int, spatial: int, batches: list, iters: int) -> dict:
    size = 2 * channels + 1
    stable, fresh = [], []
    for i in range(iters + 5):
        for samples, name in ((stable, "distft.syncbench.stats"), (fresh, f"distft.syncbench.fresh.{i}")):
            buf = mx.nd.ones((size,), dtype="float64")
            buf.wait_to_read()
            start = time.perf_counter()
            world.allreduce_([buf], name=name, average=False)
            buf.wait_to_read()
            if i >= 5:  # the first calls negotiate and fill the cache
                samples.append(time.perf_counter() - start)
    layers = {}
    for batch in batches:
        x = mx.nd.random.normal(shape=(batch, channels, spatial, spatial))
        w = mx.nd.random.normal(shape=x.shape)
        x.attach_grad()
        nets = {"local": _layer(channels, world, False), "sync": _layer(channels, world, True)}
        times = {k: [] for k in nets}
        for i in range(iters + 5):
            for kind, net in nets.items():
                took = _fwd_bwd(net, x, w)
                if i >= 5:
                    times[kind].append(took)
        layers[str(batch)] = {k: _median_us(v) for k, v in times.items()}
    return {"channels": channels, "spatial": spatial, "iters": iters, "world_size": world.size,
            "exchange_us": _median_us(stable), "exchange_fresh_names_us": _median_us(fresh), "layer_us": layers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--spatial", type=int, default=4)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from .dist import init_world

    world = init_world()
    result = measure(world, args.channels, args.spatial, [int(b) for b in args.batches.split(",")], args.iters)
    # every rank measured; report the slower rank's figures (what the step waits for)
    for key in ("exchange_us", "exchange_fresh_names_us"):
        result[key] = _max_over_ranks(world, result[key], key)
    for batch, kinds in result["layer_us"].items():
        for kind in kinds:
            kinds[kind] = _max_over_ranks(world, kinds[kind], f"{batch}.{kind}")
    if world.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def _max_over_ranks(world, value: float, name: str) -> float:
    import numpy as np

    gathered = world.allgather_bytes(np.float64(value).tobytes(), f"distft.syncbench.max.{name}")
    return float(max(np.frombuffer(g, dtype=np.float64)[0] for g in gathered))


if __name__ == "__main__":
    raise SystemExit(main())
