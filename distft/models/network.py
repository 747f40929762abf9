"""The MXNet seam for models: build a model-zoo network, check a model section before any data
is read, load pretrained weights into everything but the head, and run it as frozen prefix +
trainable suffix. (Gluon's private fields are read in `gluon.py`.)
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import io
import os
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

from distft.errors import CheckpointError, ModelError, mxnet_reason
from distft.models import inputsize, zoo
from distft.models.gluon import (children, dense_flattens, find_block, hybridize_except, is_training_batchnorm,
                                 model_names, structural_params)


def require_known(name: str) -> None:
    if name not in model_names():
        close = difflib.get_close_matches(name, model_names(), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"model.name: no model-zoo network named {name!r}{hint}")


def build(name: str, classes: int) -> gluon.HybridBlock:
    require_known(name)
    return vision.get_model(name, classes=classes)


def require_head(net: gluon.Block, cfg_model) -> None:
    top = children(net)
    if cfg_model.head not in top:
        raise ModelError(f"model.head: {cfg_model.name} has no top-level block {cfg_model.head!r} "
                         f"(it has {', '.join(top)})")


def check(cfg_model) -> None:
    """What the model section can get wrong, found in seconds and before any data is read:
    the network's name, its head, the input size, and that the pretrained weights are there
    (a .params path that exists; model-zoo weights for the name). Whether the file fits the
    network is known only once it is loaded (`create`)."""
    require_known(cfg_model.name)
    require_head(vision.get_model(cfg_model.name, classes=2), cfg_model)  # no weights are allocated
    inputsize.require_fits(cfg_model.name, cfg_model.image_size)
    pretrained = cfg_model.pretrained
    if pretrained is True:
        zoo.expected_sha1(cfg_model.name)
    elif pretrained and not os.path.isfile(os.path.expanduser(pretrained)):
        raise ModelError(f"model.pretrained: {pretrained}: no such file")


# --- weights ---------------------------------------------------------------------------------


def _summarise(names: list[str], limit: int = 5) -> str:
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_pretrained(net: gluon.Block, path: str, head: str, ctx, what: str = "model.pretrained") -> int:
    """Load a `save_parameters` file into every parameter outside `head` (all of them when
    `head` is ""). Returns the count loaded. Errors name `what` (a key) and the file."""
    if not os.path.isfile(path):
        raise ModelError(f"{what}: {path}: no such file")
    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError as exc:
        first = mxnet_reason(exc)
        raise ModelError(f"{what}: {path}: not an MXNet .params file ({first})") from None
    if not isinstance(loaded, dict):
        raise ModelError(f"{what}: {path}: holds a list of arrays, not named parameters")
    # files written by export() prefix names with arg:/aux:
    loaded = {k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k: v for k, v in loaded.items()}
    params = structural_params(net)
    if loaded and not set(loaded) & set(params):
        # saved with collect_params().save(): keys are prefixed names (resnetv20_conv0_weight)
        by_prefixed = {p.name: k for k, p in params.items()}
        if set(loaded) & set(by_prefixed):
            loaded = {by_prefixed.get(k, k): v for k, v in loaded.items()}

    def outside_head(key: str) -> bool:
        return not head or not (key == head or key.startswith(head + "."))

    missing = [k for k in params if outside_head(k) and k not in loaded]
    unexpected = [k for k in loaded if outside_head(k) and k not in params]
    misshaped = [f"{k} (file {tuple(loaded[k].shape)}, model {tuple(params[k].shape)})"
                 for k in params if outside_head(k) and k in loaded
                 and tuple(loaded[k].shape) != tuple(params[k].shape)]
    if missing or unexpected or misshaped:
        parts = []
        if misshaped:
            parts.append(f"mis-shaped: {_summarise(misshaped)}")
        if missing:
            parts.append(f"missing from the file: {_summarise(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_summarise(unexpected)}")
        raise ModelError(f"{what}: {path} does not fit this model ({len(params)} parameters); "
                         + "; ".join(parts))
    count = 0
    for key, param in params.items():
        if outside_head(key):
            param.set_data(loaded[key].astype(param.dtype, copy=False).as_in_context(ctx))
            count += 1
    return count


def create(cfg_model, ctx, seed: int) -> gluon.HybridBlock:
    """Build, initialise (shapes inferred from one dummy batch) and load pretrained weights."""
    net = build(cfg_model.name, cfg_model.classes)
    require_head(net, cfg_model)
    mx.random.seed(seed)
    np.random.seed(seed)
    net.initialize(mx.init.Xavier(magnitude=2.0), ctx=ctx)
    size = cfg_model.image_size
    try:
        # a failed shape inference prints its arguments to stdout before raising
        with contextlib.redirect_stdout(io.StringIO()):
            net(mx.nd.zeros((1, 3, size, size), ctx=ctx)).wait_to_read()
    except (mx.base.MXNetError, ValueError) as exc:
        message = inputsize.too_small(cfg_model.name, size)
        if message:
            raise ModelError(message) from None
        first = mxnet_reason(exc)
        raise ModelError(f"model.image_size: {size} does not fit {cfg_model.name}: {first}") from None
    pretrained = cfg_model.pretrained
    if pretrained is True:
        load_pretrained(net, zoo.fetch(cfg_model.name), cfg_model.head, ctx)
    elif pretrained:
        load_pretrained(net, os.path.expanduser(pretrained), cfg_model.head, ctx)
    return net


# --- running it ------------------------------------------------------------------------------


class SplitNet:
    """Runs a network as `suffix(prefix(x))`: the prefix is frozen and runs outside autograd
    recording (no activations kept), the suffix holds everything that trains."""

    def __init__(self, net: gluon.HybridBlock, prefix_paths: list[str], suffix_paths: Optional[list[str]]):
        self.net = net
        self.prefix = nn.HybridSequential(prefix="distft_prefix_")
        for path in prefix_paths:
            self.prefix.add(find_block(net, path))
        if suffix_paths is None:
            self.suffix: gluon.Block = net
        else:
            self.suffix = nn.HybridSequential(prefix="distft_suffix_")
            for path in suffix_paths:
                self.suffix.add(find_block(net, path))

    def hybridize(self, device_type: str, keep_imperative=lambda block: False) -> None:
        """Hybridize with static memory, leaving imperative every subtree that holds a block
        that cannot run in a cached graph: one for which `keep_imperative` is true (a
        synchronized BatchNorm), and a BatchNorm in training mode where MXNet's cached one is
        unreliable (`cached_batchnorm_is_unreliable`)."""
        unreliable_bn = cached_batchnorm_is_unreliable(device_type)
        for root in (self.prefix, self.suffix):
            hybridize_except(root, lambda b: keep_imperative(b) or (unreliable_bn and is_training_batchnorm(b)))

    def features(self, x):
        return self.prefix(x) if len(self.prefix) else x

    def __call__(self, x):
        return self.suffix(self.features(x))


def linear_head_problem(net: gluon.Block, head: str) -> Optional[str]:
    """Why block `head` is not one affine map of its (flattened) input, the form a linear-probe
    solver needs (None: it is: a Dense layer without activation)."""
    block = find_block(net, head)
    if not isinstance(block, nn.Dense):
        return f"{head} is a {type(block).__name__}, not one Dense layer"
    if block.act is not None:
        return f"{head} has an activation"
    if not dense_flattens(block):
        return f"{head} is a Dense layer with flatten=False"
    return None


@functools.lru_cache(maxsize=None)
def cached_batchnorm_is_unreliable(ctx_type: str) -> bool:
    """MXNet 1.9.1's oneDNN (MKLDNN) BatchNorm inside a cached graph, in training mode, gives
    wrong results from its third call on (6% of the update after 4 SGD steps of resnet18_v2,
    measured against the imperative run; exact again with MXNET_MKLDNN_ENABLED=0). Such layers
    stay imperative on oneDNN CPU builds."""
    if ctx_type != "cpu":
        return False
    if os.environ.get("MXNET_MKLDNN_ENABLED", "1") == "0":
        return False
    return mx.runtime.Features().is_enabled("MKLDNN")


def set_weights(params: dict, arrays: dict, ctx, where: str) -> None:
    """Put `arrays` (name -> NDArray, e.g. a checkpoint's) into the Parameters of the same names,
    each checked against the model's shape first; errors name `where` (the file or flag)."""
    for name, arr in arrays.items():
        p = params[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(arr.shape)}, the model {tuple(p.shape)}")
        p.set_data(arr.as_in_context(ctx))
