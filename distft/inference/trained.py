"""A finished run read back (what eval, predict and export start from): its network, run the way
training ran it at the end; its class names; its preprocessing."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from distft import precision
from distft.components import checkpoint
from distft.data import classes, preprocess
from distft.data.sets import open_dataset, resolve_model_classes
from distft.errors import CheckpointError, ConfigError, DataError
from distft.models import freeze, network
from distft.models.gluon import describe, structural_params
from distft.runfolder import CLASSES_FILE, RunFolder

def params_file(cfg, head: Optional[str] = None) -> str:
    """`train.output/model.params`; with `head` (grid runs), that head's network, which must
    exist: an unknown name is an error listing the run's heads."""
    run = RunFolder(cfg.train.output)
    if not head:
        return run.model
    heads = run.heads
    path = run.head_model(head)
    if os.path.isfile(path):
        return path
    names = sorted((d for d in (os.listdir(heads) if os.path.isdir(heads) else [])
                    if os.path.isfile(run.head_model(d))), key=lambda d: (len(d), d))
    if names:
        raise ConfigError(f"--head {head}: no head of that name in {heads} (the run's heads: {', '.join(names)})")
    raise ConfigError(f"--head {head}: {cfg.train.output} has no heads (a heads.grid run writes "
                      "heads/NAME/model.params)")


def load_network(cfg, ctx, checkpoint_dir: Optional[str] = None, head: Optional[str] = None,
                 enable_precision: bool = True):
    """(network, where its weights came from). From `train.output/model.params` (or a grid
    head's), or from a checkpoint's trainable tensors on top of the pretrained model."""
    if enable_precision:
        precision.enable(cfg.train.precision, ctx)  # as training did, before the model is built
    if checkpoint_dir:
        net = network.create(cfg.model, ctx, seed=cfg.train.seed)
        ckpt = checkpoint.load(checkpoint_dir)
        params = structural_params(net)
        unknown = sorted(set(ckpt.params) - set(params))
        if unknown:
            raise CheckpointError(f"--checkpoint: {checkpoint_dir}: not a checkpoint of {cfg.model.name} "
                                  f"(it has {', '.join(unknown[:3])})")
        network.set_weights(params, ckpt.params, ctx, f"--checkpoint: {checkpoint_dir}")
        return net, checkpoint_dir
    path = params_file(cfg, head)
    if not os.path.isfile(path):
        what = f"--head {head}" if head else "train.output"
        raise ConfigError(f"{what}: {path}: no such file (train first, or give --checkpoint DIR)")
    net = network.create(dataclasses.replace(cfg.model, pretrained=False), ctx, seed=cfg.train.seed)
    network.load_pretrained(net, path, head="", ctx=ctx, what="train.output")
    return net, path


def runner(cfg, net, ctx) -> network.SplitNet:
    """The network split and hybridized as training left it (its validation ran through this),
    so that evaluation here gives the run's figures exactly."""
    spec = describe(net, cfg.model.name, cfg.model.head)
    last_epoch = max(cfg.train.epochs - 1, 0)
    plan = freeze.plan_at(cfg, spec, last_epoch)
    freeze.apply(net, plan)
    run = network.SplitNet(net, plan.prefix, plan.suffix)
    if cfg.train.hybridize:
        run.hybridize(ctx.device_type)
    return run


def run_classes(cfg) -> list[str]:
    """The finished run's class names (index = label), and `cfg.model.classes` set to their
    number: what eval, predict and export build the network with, `model.classes: auto` or not.

    From `train.output/classes.json` (written by every run). A run folder without one (an
    older distft) falls back to what training would resolve: data.train's class folders, or
    "0", "1", … for a numeric model.classes."""
    names = classes.load(cfg.train.output)
    if names is not None:
        if cfg.model.classes != "auto" and cfg.model.classes != len(names):
            raise ConfigError(f"model.classes: {cfg.model.classes}, but the run in train.output was trained with "
                              f"{len(names)} classes ({CLASSES_FILE}); set it to {len(names)} or auto")
        cfg.model.classes = len(names)
        return names
    if cfg.model.classes == "auto":
        if not cfg.data.train:
            raise ConfigError(f"model.classes: auto, and {cfg.train.output} has no {CLASSES_FILE} to read "
                              "the classes from; set model.classes or data.train")
        resolve_model_classes(cfg)
    names = _train_names(cfg)
    if names is not None and len(names) == cfg.model.classes:
        return list(names)
    return [str(i) for i in range(cfg.model.classes)]


def _train_names(cfg) -> Optional[list]:
    """data.train's class names, when it has them (folders, a .rec's .classes.json, the demo)."""
    if not cfg.data.train:
        return None
    try:
        return open_dataset(cfg.data.train, "train", "data.train").class_names
    except DataError:
        return None


def preprocessing(cfg) -> preprocess.Preprocess:
    return preprocess.for_run(cfg)
