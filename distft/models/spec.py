"""A network's block tree as plain data: what freeze planning works on, and what a unit test
builds by hand without MXNet."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


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
