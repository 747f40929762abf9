"""Feature cache: the frozen prefix's output for each sample, computed once.

The prefix runs in inference mode with frozen weights, so its output for a sample never changes
(without augmentation): epochs after the first train the suffix from the cache and skip both
decoding and the prefix. Each rank caches the samples it has seen (with world-size-independent
sharding that becomes the whole data set after a few epochs)."""
from __future__ import annotations

import os

import numpy as np


class FeatureCache:
    def __init__(self, size: int, dtype: str, memory_bytes: int, directory: str, rank: int):
        self.size, self.dtype = size, np.dtype(dtype)
        self.memory_bytes, self.directory, self.rank = memory_bytes, directory, rank
        self.store = None
        self.filled = np.zeros(size, dtype=bool)
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

    def has_all(self, indices: np.ndarray) -> bool:
        return bool(self.filled[indices].all())

    def get(self, indices: np.ndarray) -> np.ndarray:
        self.hits += len(indices)
        return np.asarray(self.store[indices], dtype=np.float32)

    def put(self, indices: np.ndarray, features: np.ndarray) -> None:
        if self.store is None:
            self._allocate(features.shape[1:])
        self.misses += len(indices)
        self.store[indices] = features.astype(self.dtype, copy=False)
        self.filled[indices] = True

    def close(self) -> None:
        if self.path:
            self.store = None
            os.remove(self.path)
