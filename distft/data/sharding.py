"""World-size-independent sharding of a data set over the ranks.

Sharding (`reshuffled`, the default): every epoch has one permutation, drawn from (data.seed,
epoch) alone. Global step t covers positions [t*B*N, (t+1)*B*N) of it and rank r takes its r-th
slice of B, so the union of the ranks' batches at step t is exactly what one process with batch
B*N takes at step t.

`fixed`: rank r owns the r-th of N equal slices of one permutation drawn from data.seed, for the
whole run, and reshuffles it every epoch. Every epoch then shows each rank the same samples
(what a feature cache needs: nothing is computed twice); the N-rank run learns what the
one-process run learns in distribution, not batch for batch. The fewer than N*B samples left
over by the split are not used (reshuffled sharding drops other ones each epoch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class ShardSampler:
    size: int  # samples in the data set
    batch_size: int  # per rank
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True
    fixed: bool = False  # data.shards: fixed (see the module's docstring)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches only, so every rank takes the same number of steps."""
        return self.size // self.global_batch

    def shard(self) -> np.ndarray:
        """The samples this rank may ever read (everything, unless shards are fixed)."""
        if not self.fixed:
            return np.arange(self.size)
        per = self.steps_per_epoch * self.batch_size  # what an epoch takes: all of it, every epoch
        owner = np.random.default_rng([self.seed, _FIXED_SHARDS]).permutation(self.size) if self.shuffle \
            else np.arange(self.size)
        return owner[self.rank * per:(self.rank + 1) * per]

    def unassigned(self) -> np.ndarray:
        """Fixed shards: the samples no rank's shard holds (the remainder of the full global
        batches), which no epoch trains on."""
        owner = np.random.default_rng([self.seed, _FIXED_SHARDS]).permutation(self.size) if self.shuffle \
            else np.arange(self.size)
        return owner[self.steps_per_epoch * self.batch_size * self.world_size:]

    def permutation(self, epoch: int) -> np.ndarray:
        """Reshuffled: the epoch's permutation of the whole data set. Fixed: of this rank's shard."""
        if self.fixed:
            mine = self.shard()
            if not self.shuffle:
                return mine
            return mine[np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(mine))]
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def indices(self, epoch: int, step: int, perm: Optional[np.ndarray] = None) -> np.ndarray:
        perm = self.permutation(epoch) if perm is None else perm
        start = step * self.batch_size if self.fixed else step * self.global_batch + self.rank * self.batch_size
        return perm[start:start + self.batch_size]


_FIXED_SHARDS = 0x5A4D  # a seed stream of its own for the fixed shard assignment


def eval_shard(size: int, world_size: int, rank: int) -> np.ndarray:
    """Validation: strided, not dropped: the ranks together see every sample exactly once."""
    return np.arange(rank, size, world_size)
