"""How much memory one rank needs for a run's heads: the whole network once, the trainable
part's other copies, and per head its gradients, optimizer state and the activations backward
keeps, against what this machine has (`distft plan`, and a grid's check before it starts)."""
from __future__ import annotations

import mxnet as mx
import numpy as np

from distft.components.probe import history_pairs
from distft.console import log
from distft.errors import ConfigError
from distft.models.freeze import suffix_param_names
from distft.models.network import SplitNet
from distft.train.grid import grid_points


def optimizer_slots(cfg, trainable_params: int = 0) -> int:
    """State arrays (of the trainable tensors' float32 size) per trainable tensor: Adam's two
    moments, momentum's one; lbfgs's pairs (s, y) in float64."""
    if cfg.optimizer.name == "lbfgs":
        return 2 * 2 * history_pairs(cfg.optimizer.history, max(trainable_params, 1))
    if cfg.optimizer.name == "adam":
        return 2
    momenta = [cfg.optimizer.momentum, *cfg.heads.grid.get("optimizer.momentum", [])]
    return 1 if any(m > 0 for m in momenta) else 0


def activation_bytes(runner: SplitNet, micro: int, image_size: int) -> int:
    """Bytes of the trainable part's intermediate outputs for one micro-batch (what backward
    keeps), from symbolic shape inference: an estimate (MXNet may share or free some)."""
    data = mx.sym.var("data")
    shape = (micro, 3, image_size, image_size)
    if len(runner.prefix):
        _, (shape,), _ = runner.prefix(data).infer_shape(data=shape)
    internals = runner.suffix(data).get_internals()
    _, out_shapes, _ = internals.infer_shape(data=shape)
    outputs = [n for n in internals.list_outputs() if n.endswith("_output")]
    sizes = dict(zip(internals.list_outputs(), out_shapes))
    return 4 * (int(np.prod(shape)) + sum(int(np.prod(sizes[n])) for n in outputs))


def memory_estimate(cfg, plan, runner: SplitNet, heads: int, micro: int) -> dict:
    """Bytes one rank needs for `heads` copies of the trainable part: the whole network once,
    the trainable part's other copies, and per head its gradients, optimizer state and the
    activations backward keeps."""
    t = plan.totals()
    suffix_names = set(suffix_param_names(plan, [p.name for p in plan.params]))
    suffix_bytes = sum(p.spec.nbytes for p in plan.params if p.name in suffix_names)
    est = {
        "heads": heads,
        "weights": t["total_bytes"] + (heads - 1) * suffix_bytes,
        "gradients": heads * t["trainable_bytes"],
        "optimizer_state": heads * t["trainable_bytes"] * optimizer_slots(cfg, t["trainable_params"]),
        "activations": heads * activation_bytes(runner, micro, cfg.model.image_size),
        "micro_batch": micro,
    }
    est["total"] = sum(est[k] for k in ("weights", "gradients", "optimizer_state", "activations"))
    return est


def plan_memory(cfg, stages: list, net) -> dict:
    """What `distft plan` shows: K x the trainable bytes, and the memory estimate against this
    machine's (its first GPU, else the host's available RAM), for the stage that needs the
    most. `stages`: [(label, plan)], the plan at epoch 0 first, then freeze.schedule's."""
    k = len(grid_points(cfg.heads.grid))
    estimates = [(label, plan, memory_estimate(cfg, plan, SplitNet(net, plan.prefix, plan.suffix), k,
                                               cfg.data.batch_size)) for label, plan in stages]
    label, plan, est = max(estimates, key=lambda e: e[2]["total"])  # the first of equals
    ctx = mx.gpu(0) if mx.context.num_gpus() else mx.cpu()
    have, what = device_memory(ctx)
    return {**est, "stage": label, "stages": len(stages), "trainable_bytes": k * plan.totals()["trainable_bytes"],
            "device_bytes": have, "device": what, "fits": est["total"] <= have}


def memory_lines(m: dict) -> str:
    def mib(n: int) -> str:
        return f"{n / 2 ** 20:,.1f} MiB"

    stage = f", the largest stage: {m['stage']}" if m["stages"] > 1 else ""
    return (f"heads: {m['heads']} x trainable = {m['trainable_bytes']:,} B\n"
            f"memory per rank (estimate, micro-batch {m['micro_batch']}{stage}): weights {mib(m['weights'])}, "
            f"gradients {mib(m['gradients'])}, optimizer state {mib(m['optimizer_state'])}, activations of the "
            f"trainable part {mib(m['activations'])} = {mib(m['total'])} of {mib(m['device_bytes'])} "
            f"({m['device']}){'' if m['fits'] else ': does not fit'}")


def device_memory(ctx, ranks_here: int = 1) -> tuple[int, str]:
    """(bytes, what): the GPU's memory, or this rank's share of the host's available RAM."""
    if ctx.device_type == "gpu":
        _free, total = mx.context.gpu_memory_info(ctx.device_id)
        return int(total), f"GPU {ctx.device_id} memory"
    import psutil

    rss = psutil.Process().memory_info().rss
    return int(psutil.virtual_memory().available // max(ranks_here, 1) + rss), "host RAM available per rank"


def check_fits(cfg, world, plan, runner, heads: int, ctx) -> None:
    est = memory_estimate(cfg, plan, runner, heads, cfg.data.batch_size)
    have, what = device_memory(ctx, world.local_size)
    if est["total"] > have:
        raise ConfigError(f"heads.grid: {heads} heads need about {est['total'] / 2**30:.1f} GiB per rank "
                          f"(weights {est['weights'] / 2**30:.2f}, gradients {est['gradients'] / 2**30:.2f}, "
                          f"optimizer state {est['optimizer_state'] / 2**30:.2f}, activations "
                          f"{est['activations'] / 2**30:.2f} GiB at a micro-batch of {est['micro_batch']}), more "
                          f"than the {have / 2**30:.1f} GiB of {what}; use fewer points or a smaller data.batch_size")
    log(world, f"heads.grid: {heads} heads, about {est['total'] / 2**30:.2f} GiB per rank "
               f"of {have / 2**30:.1f} GiB ({what})")
