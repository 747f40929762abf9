"""Feature cache: the frozen prefix's output for each sample, computed once.

The prefix runs in inference mode with frozen weights, so its output for a sample never changes
(without augmentation): epochs after the first train the suffix from the cache and skip both
decoding and the prefix. Each rank holds a slot for every sample of its shard (data.shards:
fixed), so after epoch 0 every batch it takes is cached."""
from __future__ import annotations

import os

import numpy as np


class FeatureCache:
    def __init__(self, samples: np.ndarray, dtype: str, memory_bytes: int, directory: str, rank: int):
        """`samples`: the data-set indices this rank can be asked for (its shard)."""
        samples = np.asarray(samples, dtype=np.int64)
        self.size, self.dtype = len(samples), np.dtype(dtype)
        self.memory_bytes, self.directory, self.rank = memory_bytes, directory, rank
        self.slot = np.full(int(samples.max()) + 1 if len(samples) else 0, -1, dtype=np.int64)
        self.slot[samples] = np.arange(len(samples))
        self.store = None
        self.filled = np.zeros(self.size, dtype=bool)
        self.path = None
        self.hits = 0
        self.misses = 0

    def _allocate(self, shape: tuple) -> None:
        nbytes = self.size * int(np.prod(shape)) * self.dtype.itemsize
        if nbytes <= self.memory_bytes:
            self.store = np.empty((self.size, *shape), dtype=self.dtype)
        else:
            os.makedirs(self.directory, exist_ok=True)
            self.path = os.path.join(self.directory, f"features-rank{self.rank}.{self.dtype.name}")
            self.store = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=(self.size, *shape))

    def _slots(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.max() >= len(self.slot) or (self.slot[indices] < 0).any()):
            raise IndexError("feature cache: asked for a sample outside this rank's shard")
        return self.slot[indices]

    def has_all(self, indices: np.ndarray) -> bool:
        return bool(self.filled[self._slots(indices)].all())

    def get(self, indices: np.ndarray, count: bool = True) -> np.ndarray:
        """`count`: a read of training (counted in `hits`), not one that measures (probe.py)."""
        self.hits += len(indices) if count else 0
        return np.asarray(self.store[self._slots(indices)], dtype=np.float32)

    def put(self, indices: np.ndarray, features: np.ndarray, count: bool = True) -> None:
        if self.store is None:
            self._allocate(features.shape[1:])
        slots = self._slots(indices)
        self.misses += len(indices) if count else 0
        self.store[slots] = features.astype(self.dtype, copy=False)
        self.filled[slots] = True

    def close(self) -> None:
        if self.path:
            self.store = None
            os.remove(self.path)
