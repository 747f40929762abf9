"""The Gluon seam: every read or write of a Gluon block's private fields (its children, its
parameters by structural name, a BatchNorm's operator arguments, Dense's flatten flag) and of the
model zoo's private tables happens here, and nowhere else in distft.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
from mxnet import gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import model_store, vision

from distft.models.spec import BlockSpec, ModelSpec, ParamSpec

BN_TYPES = (nn.BatchNorm,)


# --- the model zoo ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def model_names() -> tuple[str, ...]:
    """The model zoo's networks. It keeps its registry inside get_model; its error lists the names."""
    try:
        vision.get_model("\0")
    except ValueError as exc:
        return tuple(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
    return ()


def zoo_sha1(name: str) -> Optional[str]:
    """The model store's SHA-1 of `<name>-<short hash>.params` (None: no pretrained weights)."""
    return model_store._model_sha1.get(name)  # noqa: SLF001 - the store's own table


# --- the block tree ----------------------------------------------------------------------------


def children(block: gluon.Block) -> dict:
    """A block's direct children by name, in registration order."""
    return block._children  # noqa: SLF001 - Gluon keeps children here


def iter_blocks(net: gluon.Block, prefix: str = ""):
    """(path, block) for every descendant, depth first, in registration order."""
    for key, child in children(net).items():
        path = f"{prefix}.{key}" if prefix else key
        yield path, child
        yield from iter_blocks(child, path)


def structural_params(net: gluon.Block) -> dict[str, gluon.Parameter]:
    """Parameters keyed by structural name, the keys `save_parameters` writes."""
    return net._collect_params_with_prefix()  # noqa: SLF001


def find_block(net: gluon.Block, path: str) -> gluon.Block:
    block = net
    for key in path.split("."):
        block = children(block)[key]
    return block


def execution_stages(net: gluon.Block, head: str) -> Optional[list[str]]:
    """The model-zoo convention: forward is `output(features(x))`. Then the stages are the
    children of `features` followed by the head, and a leading run of them can be run as a
    separate frozen prefix."""
    top = children(net)
    if set(top) != {"features", head} or not isinstance(top["features"], nn.HybridSequential):
        return None
    return [f"features.{k}" for k in children(top["features"])] + [head]


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


# --- layer settings ----------------------------------------------------------------------------


def batchnorm_setting(bn: nn.BatchNorm, key: str, default=None):
    """An argument a BatchNorm passes to its operator (eps, momentum, fix_gamma, axis, ...)."""
    return bn._kwargs.get(key, default)  # noqa: SLF001 - passed to the BN op


def set_use_global_stats(bn: nn.BatchNorm, frozen: bool) -> None:
    """Normalise with the running statistics and never update them (a frozen BatchNorm)."""
    bn._kwargs["use_global_stats"] = frozen  # noqa: SLF001 - passed to the BN op


def is_training_batchnorm(block) -> bool:
    """A BatchNorm that normalises with batch statistics (it trains or re-estimates)."""
    return isinstance(block, BN_TYPES) and not batchnorm_setting(block, "use_global_stats")


def dense_flattens(block: nn.Dense) -> bool:
    return bool(block._flatten)  # noqa: SLF001 - Dense keeps the flag here


# --- hybridization -----------------------------------------------------------------------------


def _contains(block, predicate) -> bool:
    return predicate(block) or any(_contains(c, predicate) for c in children(block).values())


def hybridize_except(block, predicate) -> None:
    """Hybridize `block` with static memory, leaving imperative every subtree that holds a block
    for which `predicate` is true."""
    if not _contains(block, predicate):
        if isinstance(block, gluon.HybridBlock):
            block.hybridize(True, static_alloc=True, static_shape=True)
        return
    if isinstance(block, gluon.HybridBlock):
        block.hybridize(False)  # clears a cached graph; children are set below
    for child in children(block).values():
        hybridize_except(child, predicate)
