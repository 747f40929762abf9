"""The MXNet seam for models: build a model-zoo network, describe its block tree as plain data,
load pretrained weights into everything but the head, and run it as frozen prefix + trainable
suffix.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import io
import os
from dataclasses import dataclass, field
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

from . import zoo
from . import inputsize
from .errors import ModelError, mxnet_reason

BN_TYPES = (nn.BatchNorm,)


# --- plain-data description of a network (what freeze planning works on) --------------------


@dataclass(frozen=True)
class ParamSpec:
    name: str  # structural name, e.g. features.5.0.bn1.gamma
    block: str  # owning block path, e.g. features.5.0.bn1
    shape: tuple
    dtype: str
    grad_req: str  # as constructed (BN gamma with scale=False is already 'null')
    differentiable: bool  # False for BN running statistics (aux states)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class BlockSpec:
    path: str
    type: str
    is_batchnorm: bool


@dataclass
class ModelSpec:
    name: str
    head: str
    blocks: list[BlockSpec]
    params: list[ParamSpec]
    # paths whose sequential application is the whole forward pass (None: not sequential)
    stages: Optional[list[str]] = field(default=None)

    def block_paths(self) -> list[str]:
        return [b.path for b in self.blocks]


@functools.lru_cache(maxsize=1)
def model_names() -> tuple[str, ...]:
    """The model zoo keeps its registry inside get_model; its error lists the names."""
    try:
        vision.get_model("\0")
    except ValueError as exc:
        return tuple(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
    return ()


def require_known(name: str) -> None:
    if name not in model_names():
        close = difflib.get_close_matches(name, model_names(), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"model.name: no model-zoo network named {name!r}{hint}")


def build(name: str, classes: int) -> gluon.HybridBlock:
    require_known(name)
    return vision.get_model(name, classes=classes)


def require_head(net: gluon.Block, cfg_model) -> None:
    children = net._children  # noqa: SLF001
    if cfg_model.head not in children:
        raise ModelError(f"model.head: {cfg_model.name} has no top-level block {cfg_model.head!r} "
                         f"(it has {', '.join(children)})")


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


def iter_blocks(net: gluon.Block, prefix: str = ""):
    """(path, block) for every descendant, depth first, in registration order."""
    for key, child in net._children.items():  # noqa: SLF001 - Gluon keeps children here
        path = f"{prefix}.{key}" if prefix else key
        yield path, child
        yield from iter_blocks(child, path)


def structural_params(net: gluon.Block) -> dict[str, gluon.Parameter]:
    """Parameters keyed by structural name, the keys `save_parameters` writes."""
    return net._collect_params_with_prefix()  # noqa: SLF001


def find_block(net: gluon.Block, path: str) -> gluon.Block:
    block = net
    for key in path.split("."):
        block = block._children[key]  # noqa: SLF001
    return block


def execution_stages(net: gluon.Block, head: str) -> Optional[list[str]]:
    """The model-zoo convention: forward is `output(features(x))`. Then the stages are the
    children of `features` followed by the head, and a leading run of them can be run as a
    separate frozen prefix."""
    children = net._children  # noqa: SLF001
    if set(children) != {"features", head} or not isinstance(children["features"], nn.HybridSequential):
        return None
    return [f"features.{k}" for k in children["features"]._children] + [head]  # noqa: SLF001


def describe(net: gluon.Block, name: str, head: str) -> ModelSpec:
    blocks = [BlockSpec(path, type(b).__name__, isinstance(b, BN_TYPES)) for path, b in iter_blocks(net)]
    params = []
    for pname, p in structural_params(net).items():
        params.append(ParamSpec(
            name=pname, block=pname.rpartition(".")[0], shape=tuple(p.shape),
            dtype=np.dtype(p.dtype).name, grad_req=p.grad_req,
            differentiable=bool(getattr(p, "_differentiable", True))))
    return ModelSpec(name=name, head=head, blocks=blocks, params=params,
                     stages=execution_stages(net, head))


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

    def hybridize(self, keep_imperative=lambda block: False) -> None:
        """Hybridize with static memory, leaving imperative every subtree that holds a block
        for which `keep_imperative` is true (e.g. a synchronized BatchNorm)."""
        for root in (self.prefix, self.suffix):
            _hybridize_except(root, keep_imperative)

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
    if not block._flatten:  # noqa: SLF001 - Dense keeps the flag here
        return f"{head} is a Dense layer with flatten=False"
    return None


def is_training_batchnorm(block) -> bool:
    """A BatchNorm that normalises with batch statistics (it trains or re-estimates)."""
    return isinstance(block, BN_TYPES) and not block._kwargs.get("use_global_stats")  # noqa: SLF001


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


def _contains(block, predicate) -> bool:
    return predicate(block) or any(_contains(c, predicate) for c in block._children.values())  # noqa: SLF001


def _hybridize_except(block, predicate) -> None:
    if not _contains(block, predicate):
        if isinstance(block, gluon.HybridBlock):
            block.hybridize(True, static_alloc=True, static_shape=True)
        return
    if isinstance(block, gluon.HybridBlock):
        block.hybridize(False)  # clears a cached graph; children are set below
    for child in block._children.values():  # noqa: SLF001
        _hybridize_except(child, predicate)
