"""A prefetching batch loader, and the rule for unreadable files."""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from distft.data.transforms import Transform
from distft.errors import DataError

def bad_file_limit(files: int, max_bad_fraction: float, max_bad_files: int) -> int:
    """How many unreadable files a data set of `files` may hold and still train: a few in a
    small set (max_bad_files), a fraction of a large one."""
    return max(int(max_bad_fraction * files), max_bad_files)


class BatchLoader:
    """Assembles batches on background threads, `depth` batches ahead of the training step.

    An unreadable sample is replaced by another sample of the same batch (the batch keeps its
    size, so ranks stay in step) and counted; once more files than `bad_file_limit` allows
    are unreadable, the job stops with the file named."""

    def __init__(self, dataset, transform: Transform, workers: int = 2, depth: int = 2,
                 max_bad_fraction: float = 0.0, max_bad_files: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.workers = workers
        self.depth = depth
        self.bad_limit = bad_file_limit(len(dataset), max_bad_fraction, max_bad_files)
        self.bad = 0  # unreadable samples read (a bad file read every epoch counts every time)
        self.bad_files: set = set()
        self.seen = 0
        # one worker: the prefetching thread decodes itself (a pool would only add a hand-off)
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def _try_sample(self, i: int, epoch: int, out: np.ndarray):
        """Sample i into `out` (its row of the batch); the DataError when it is unreadable."""
        read = getattr(self.dataset, "encoded", self.dataset.read)  # bytes: decoded at the crop's scale
        try:
            self.transform(read(int(i)), epoch, int(i), out=out)
        except DataError as exc:
            return exc
        return None

    def batch(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return self._finish(self._start(indices, epoch))

    def _start(self, indices: np.ndarray, epoch: int) -> tuple:
        """Hand a batch's samples to the workers (none: nothing yet); `_finish` collects them."""
        s = self.transform.size
        x = np.empty((len(indices), 3, s, s), dtype=np.float32)

        def rows(ks):
            return [self._try_sample(indices[k], epoch, x[k]) for k in ks]

        if self._pool is None or len(indices) < 2:
            return indices, x, None, rows
        # a few runs of rows per worker, not a task per sample: fewer hand-offs between threads
        runs = np.array_split(np.arange(len(indices)), min(len(indices), 4 * self.workers))
        return indices, x, [self._pool.submit(rows, run) for run in runs], rows

    def _finish(self, started: tuple) -> tuple[np.ndarray, np.ndarray]:
        indices, x, pending, rows = started
        xs = rows(range(len(indices))) if pending is None else [e for f in pending for e in f.result()]
        labels = self.dataset.labels[indices].copy()
        self.seen += len(xs)
        bad = [k for k, e in enumerate(xs) if isinstance(e, DataError)]
        if bad:
            self.bad += len(bad)
            self.bad_files.update(int(indices[k]) for k in bad)
            if len(self.bad_files) > self.bad_limit:
                raise DataError(f"data.max_bad_fraction: {len(self.bad_files)} unreadable files, more than the "
                                f"{self.bad_limit} allowed of {len(self.dataset)}; latest: {xs[bad[-1]]}")
            if len(bad) == len(xs):
                raise DataError(f"every file of a batch is unreadable; latest: {xs[bad[-1]]}")
            good = next(k for k, e in enumerate(xs) if e is None)
            for k in bad:
                x[k], labels[k] = x[good], labels[good]
        return x, labels

    def iterate(self, batches: list[tuple[int, np.ndarray]], epoch: int, skip=None) -> Iterator:
        """Yields (step, indices, x, y) for `batches` = [(step, indices)], prefetching on a
        thread. `skip(indices)` true: x is None (e.g. the feature cache holds the batch)."""
        def start(step, idx):
            if skip is not None and skip(idx):
                return step, idx, None
            return step, idx, self._start(idx, epoch)

        def finish(step, idx, started):
            if started is None:
                return step, idx, None, self.dataset.labels[idx]
            return (step, idx, *self._finish(started))

        if self.workers == 0:
            for step, idx in batches:
                yield finish(*start(step, idx))
            return
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce():
            # the next batch is handed to the workers before this one is collected: no worker
            # idles at a batch's end waiting for the slowest run of it
            try:
                in_flight: deque = deque()
                for step, idx in batches:
                    if stop.is_set():
                        return
                    in_flight.append(start(step, idx))
                    if len(in_flight) > 1:
                        q.put(finish(*in_flight.popleft()))
                while in_flight:
                    q.put(finish(*in_flight.popleft()))
                q.put(None)
            except BaseException as exc:  # handed to the consumer, raised there
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True, name="distft-loader")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
