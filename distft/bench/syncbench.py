"""What a synchronized BatchNorm costs on this machine, per statistics channel, for `distft bench`.

Run under a launcher (every rank takes part):

    horovodrun -np 2 python -m distft.bench.syncbench --channels 512 --spatial 2 --batches 8,32 --out r.json

- `exchange_us[channel]`: one statistics exchange as a layer sends it (2C+1 float64 from the
  host, summed over the ranks and waited for), through each channel this launcher offers: `mpi`
  (where MPI is up) and `horovod` (Horovod's queue), side by side;
- `layer_us[batch]`: one BatchNorm layer, forward + backward of a (batch, C, S, S) input whose
  gradient is needed, waited for: MXNet's BatchNorm (hybridized, as `dist.batchnorm: local`
  runs it) against ours synchronized over each channel.
Every figure is the median of its repeats, the slower rank's; the variants are interleaved, so
that a slow spell of a shared machine hits them alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import mxnet as mx
from mxnet import autograd
from mxnet.gluon import nn

from distft.distributed import bnchannel, syncbn
from distft.distributed.bnexchange import Exchanges
from distft.distributed.world import init_world


def _median_us(samples: list) -> float:
    return statistics.median(samples) * 1e6


def channels(world) -> dict:
    """Every statistics channel this world can open, by name (the MPI one where MPI is up)."""
    out = {"horovod": bnchannel.HorovodChannel(world.hvd)}
    if getattr(world, "mpi_comm", None) is not None and bnchannel.mpi_thread_level_ok()[0]:
        out["mpi"] = bnchannel.MPIChannel(world.mpi_comm)
    return out


def _layer(channels_: int, channel):
    net = nn.HybridSequential()
    net.add(nn.BatchNorm(in_channels=channels_))
    net.initialize()
    if channel is None:
        net.hybridize(static_alloc=True, static_shape=True)
    else:
        syncbn.convert(net, ["0"], Exchanges(channel))
    return net


def _fwd_bwd(net, x, w) -> float:
    start = time.perf_counter()
    with autograd.record():
        loss = (net(x) * w).sum()
    loss.backward()
    x.grad.wait_to_read()
    net[0].gamma.grad().wait_to_read()
    return time.perf_counter() - start


def measure(world, channels_: int, spatial: int, batches: list, iters: int) -> dict:
    offered = channels(world)
    exchange = {name: bnchannel.latency_us(ch, 2 * channels_ + 1, iters) for name, ch in offered.items()}
    layers = {}
    for batch in batches:
        x = mx.nd.random.normal(shape=(batch, channels_, spatial, spatial))
        w = mx.nd.random.normal(shape=x.shape)
        x.attach_grad()  # a layer inside the stage: its backward exchanges
        nets = {"local": _layer(channels_, None), **{name: _layer(channels_, ch) for name, ch in offered.items()}}
        times: dict = {k: [] for k in nets}
        for i in range(iters + 5):
            for kind, net in nets.items():
                took = _fwd_bwd(net, x, w)
                if i >= 5:
                    times[kind].append(took)
        layers[str(batch)] = {k: _median_us(v) for k, v in times.items()}
    return {"channels": channels_, "spatial": spatial, "iters": iters, "world_size": world.size,
            "exchange_us": exchange, "layer_us": layers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--spatial", type=int, default=4)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    world = init_world(statistics="horovod")  # Horovod's cycle as when it carries statistics
    result = measure(world, args.channels, args.spatial, [int(b) for b in args.batches.split(",")], args.iters)
    # every rank measured; report the slower rank's figures (what the step waits for)
    for name in result["exchange_us"]:
        result["exchange_us"][name] = _max_over_ranks(world, result["exchange_us"][name], f"exchange.{name}")
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
