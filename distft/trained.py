"""A finished run read back (what eval, predict and export start from): its network, run the way
training ran it at the end; its class names; its preprocessing."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from . import checkpoint, freeze, model, precision, preprocess
from .data import ImageFolder
from .errors import CheckpointError, ConfigError, DataError

CLASSES_FILE = "classes.json"


def params_file(cfg, head: Optional[str] = None) -> str:
    """`train.output/model.params`; with `head` (grid runs), that head's network."""
    if head:
        return os.path.join(cfg.train.output, "heads", head, "model.params")
    return os.path.join(cfg.train.output, "model.params")


def load_network(cfg, ctx, checkpoint_dir: Optional[str] = None, head: Optional[str] = None,
                 enable_precision: bool = True):
    """(network, where its weights came from). From `train.output/model.params` (or a grid
    head's), or from a checkpoint's trainable tensors on top of the pretrained model."""
    if enable_precision:
        precision.enable(cfg.train.precision, ctx)  # as training did, before the model is built
    if checkpoint_dir:
        net = model.create(cfg.model, ctx, seed=cfg.train.seed)
        ckpt = checkpoint.load(checkpoint_dir)
        params = model.structural_params(net)
        unknown = sorted(set(ckpt.params) - set(params))
        if unknown:
            raise CheckpointError(f"--checkpoint: {checkpoint_dir}: not a checkpoint of {cfg.model.name} "
                                  f"(it has {', '.join(unknown[:3])})")
        for name, arr in ckpt.params.items():
            if tuple(arr.shape) != tuple(params[name].shape):
                raise CheckpointError(f"--checkpoint: {checkpoint_dir}: {name} has shape {tuple(arr.shape)}, "
                                      f"the model {tuple(params[name].shape)}")
            params[name].set_data(arr.as_in_context(ctx))
        return net, checkpoint_dir
    path = params_file(cfg, head)
    if not os.path.isfile(path):
        what = f"--head {head}" if head else "train.output"
        raise ConfigError(f"{what}: {path}: no such file (train first, or give --checkpoint DIR)")
    net = model.create(dataclasses.replace(cfg.model, pretrained=False), ctx, seed=cfg.train.seed)
    model.load_pretrained(net, path, head="", ctx=ctx, what="train.output")
    return net, path


def runner(cfg, net, ctx) -> model.SplitNet:
    """The network split and hybridized as training left it (its validation ran through this),
    so that evaluation here gives the run's figures exactly."""
    spec = model.describe(net, cfg.model.name, cfg.model.head)
    last_epoch = max(cfg.train.epochs - 1, 0)
    plan = freeze.resolve(spec, cfg.freeze.trainable, cfg.freeze.batchnorm, cfg.freeze.schedule, last_epoch)
    freeze.apply(net, plan)
    run = model.SplitNet(net, plan.prefix, plan.suffix)
    if cfg.train.hybridize:
        unreliable_bn = model.cached_batchnorm_is_unreliable(ctx.device_type)
        run.hybridize(keep_imperative=lambda b: unreliable_bn and model.is_training_batchnorm(b))
    return run


def class_names(cfg, dataset=None) -> list[str]:
    """`train.output/classes.json` (a list of names) if the run saved one, else the folder names
    of `dataset` or of data.train when they number model.classes, else "0", "1", …"""
    classes = cfg.model.classes
    path = os.path.join(cfg.train.output, CLASSES_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc})") from None
        names = doc.get("classes") if isinstance(doc, dict) else doc
        if not isinstance(names, list) or len(names) != classes or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{path}: expected a list of {classes} class names (model.classes)")
        return names
    for source in (dataset, _train_folder(cfg)):
        folders = getattr(source, "class_names", None)
        if folders and len(folders) == classes:
            return list(folders)
    return [str(i) for i in range(classes)]


def _train_folder(cfg):
    """data.train, when it is an ImageFolder: its folder names name the classes."""
    if cfg.data.train and os.path.isdir(cfg.data.train):
        try:
            return ImageFolder(cfg.data.train)
        except DataError:
            return None
    return None


def preprocessing(cfg) -> preprocess.Preprocess:
    return preprocess.for_run(cfg)
