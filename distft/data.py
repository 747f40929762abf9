"""Data sets, world-size-independent sharding and a prefetching batch loader.

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

import hashlib
import json
import os
import queue
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .errors import DataError
from .imaging import IMAGE_EXTENSIONS, decode  # noqa: F401 - the one decoder, re-exported



# --- sharding --------------------------------------------------------------------------------


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


# --- data sets: (H, W, 3) uint8 RGB images and integer labels ------------------------------


def nfc(name: str) -> str:
    """A class or file name in Unicode NFC: `café` typed on Linux and copied from macOS (NFD) is
    one name."""
    return unicodedata.normalize("NFC", name)


def is_hidden(name: str) -> bool:
    """Files and folders no user means as data: dot-files (`.DS_Store`, macOS `._*` AppleDouble
    files, `.ipynb_checkpoints/`, `.git/`) and `__MACOSX/` (a zip's resource forks)."""
    return name.startswith(".") or name == "__MACOSX"


class ImageFolder:
    """One sub-folder per class, sorted by (NFC) name, label = position. A class folder is read
    recursively (`dog/from_phone/2023/x.jpg` is a dog); two folders whose names differ only in
    Unicode form are one class. Hidden files and folders, and files without an image extension,
    are not read: they are listed in `ignored`, counted per class in `ignored_per_class`. Class
    folders without images keep their position here; data.train refuses them (see classes.py),
    data.val ignores them."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise DataError(f"{root}: not a directory")
        self.root = root
        folders: dict[str, list[str]] = {}
        self.ignored: list[str] = []  # paths not read; a hidden folder is one entry, ending in /
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isdir(path) and not is_hidden(name):
                folders.setdefault(nfc(name), []).append(path)
            else:
                self.ignored.append(path + (os.sep if os.path.isdir(path) else ""))
        self.class_names = sorted(folders)
        if not self.class_names:
            raise DataError(f"{root}: an ImageFolder needs one sub-folder per class; found none")
        self.ignored_per_class = {name: 0 for name in self.class_names}
        self.files: list[str] = []
        self.ids: list[str] = []  # class/relative path (NFC, /-separated): a file's name in the set
        labels = []
        for label, cls in enumerate(self.class_names):
            found = []
            for folder in folders[cls]:
                for path, rel in self._walk(folder, cls):
                    found.append((rel, path))
            for rel, path in sorted(found):
                self.files.append(path)
                self.ids.append(rel)
                labels.append(label)
        if not self.files:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        self.labels = np.array(labels, dtype=np.int64)
        self.classes = len(self.class_names)

    def _walk(self, folder: str, cls: str):
        """(path, id) of every image under a class folder, sub-folders included; what is not read
        is recorded as ignored. Symbolic links are followed, each real folder once."""
        seen = set()
        for here, dirs, names in os.walk(folder, followlinks=True):
            real = os.path.realpath(here)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            for d in list(dirs):
                if is_hidden(d):
                    self.ignored.append(os.path.join(here, d) + os.sep)
                    self.ignored_per_class[cls] += 1
            dirs[:] = sorted(d for d in dirs if not is_hidden(d))
            rel_dir = nfc(os.path.relpath(here, folder)).replace(os.sep, "/")
            for name in names:
                path = os.path.join(here, name)
                if is_hidden(name) or not name.lower().endswith(IMAGE_EXTENSIONS):
                    self.ignored.append(path)
                    self.ignored_per_class[cls] += 1
                    continue
                rel = nfc(name) if rel_dir == "." else f"{rel_dir}/{nfc(name)}"
                yield path, f"{cls}/{rel}"

    def identity(self) -> list[tuple[str, int]]:
        """(id, size in bytes) of every file: what `data_digest` hashes."""
        return [(i, os.path.getsize(p)) for i, p in zip(self.ids, self.files)]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        try:
            with open(self.files[i], "rb") as fh:
                payload = fh.read()
        except OSError as exc:
            raise DataError(f"{self.files[i]}: cannot read ({exc.strerror})") from None
        return decode(payload, self.files[i])


class RecordFile:
    """An indexed RecordIO file (`.rec` with its `.idx`), as written by im2rec."""

    def __init__(self, rec_path: str):
        import mxnet as mx

        idx_path = os.path.splitext(rec_path)[0] + ".idx"
        for path in (rec_path, idx_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file (a RecordIO data set needs the .rec and its .idx)")
        self.path = rec_path
        self.class_names = read_class_names(rec_path)
        self._local = threading.local()
        self._idx_path = idx_path
        try:
            probe = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
        except (mx.base.MXNetError, ValueError, OSError) as exc:
            raise DataError(f"{rec_path}: cannot open RecordIO: {exc}") from None
        self.keys = list(probe.keys)
        labels = []
        for key in self.keys:
            header, _ = mx.recordio.unpack(probe.read_idx(key))
            label = header.label
            labels.append(int(label if np.isscalar(label) else label[0]))
        probe.close()
        self.labels = np.array(labels, dtype=np.int64)
        self.classes = int(self.labels.max()) + 1 if len(labels) else 0
        self.ids = [f"record {key}" for key in self.keys]

    def identity(self) -> list[tuple[str, int]]:
        """(id, record size in bytes) of every record, from the index: what `data_digest` hashes."""
        from . import recordio

        entries = sorted(recordio.read_index(self._idx_path), key=lambda e: e[1])
        ends = [offset for _, offset in entries[1:]] + [os.path.getsize(self.path)]
        size = {key: end - offset for (key, offset), end in zip(entries, ends)}
        return [(f"record {key}", size.get(key, -1)) for key in self.keys]

    def _reader(self):
        import mxnet as mx

        if not hasattr(self._local, "reader"):  # one file handle per thread
            self._local.reader = mx.recordio.MXIndexedRecordIO(self._idx_path, self.path, "r")
        return self._local.reader

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> np.ndarray:
        import mxnet as mx

        where = f"{self.path} record {self.keys[i]}"
        try:
            _, payload = mx.recordio.unpack(self._reader().read_idx(self.keys[i]))
        except (mx.base.MXNetError, ValueError, OSError) as exc:
            raise DataError(f"{where}: unreadable record ({exc})") from None
        return decode(payload, where)



def class_names_path(rec_path: str) -> str:
    """Where the class names of a RecordIO file live: `<name>.classes.json` beside it."""
    return os.path.splitext(rec_path)[0] + ".classes.json"


def read_class_names(rec_path: str) -> Optional[list]:
    path = class_names_path(rec_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            names = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read class names ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a JSON list of class names (index = label)")
    return [nfc(n) for n in names]


class Subset:
    """A view of some samples of a data set (e.g. data.train without its data.val_split share).
    Sample i of the view is sample indices[i] of the base, so samplers see only the view."""

    def __init__(self, base, indices: np.ndarray, name: str):
        self.base, self.indices, self.name = base, np.asarray(indices, dtype=np.int64), name
        self.labels = base.labels[self.indices]
        self.classes = base.classes
        self.class_names = getattr(base, "class_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> np.ndarray:
        return self.base.read(int(self.indices[i]))


_HOLDOUT = 0x7A1  # a seed stream of its own for data.val_split (positions: checkpoints before ids)


def held_out(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which samples data.val_split holds out, as a boolean mask: sample `id` is held out when a
    seeded hash of its name falls below `fraction`. A file's side depends on its own name
    alone, so files added or removed between launches never move a trained-on sample into
    validation or back (and the same file is held out by every run with this seed). At least
    one sample is on each side."""
    draws = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
                      for i in ids], dtype=np.float64) / 2.0 ** 64
    mask = draws < fraction
    if not mask.any():
        mask[int(np.argmin(draws))] = True
    if mask.all():
        mask[int(np.argmax(draws))] = False
    return mask


def split_holdout(dataset, fraction: float, seed: int, by_position: bool = False) -> tuple[Subset, Subset]:
    """(training part, held-out part) of `dataset`, the same on every rank and launch.
    `by_position`: the split of checkpoints written before samples had names (a seeded
    permutation of positions, round(n x fraction) held out), kept for their resumes."""
    n = len(dataset)
    if n < 2:
        raise DataError(f"data.val_split: data.train has {n} sample(s); nothing to hold out")
    if by_position:
        n_val = min(max(1, int(round(n * fraction))), n - 1)
        order = np.random.default_rng([seed, _HOLDOUT]).permutation(n)
        train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    else:
        mask = held_out(dataset.ids, fraction, seed)
        train, val = np.flatnonzero(~mask), np.flatnonzero(mask)
    return Subset(dataset, train, "train"), Subset(dataset, val, "val_split")


def data_digest(dataset) -> dict:
    """What makes data.train the same data set at a relaunch: every file's (or record's) name
    and size, and the class names. {"digest", "files"}."""
    base = dataset.base if isinstance(dataset, Subset) else dataset
    h = hashlib.sha256(json.dumps(getattr(base, "class_names", None)).encode())
    entries = base.identity()
    for ident, size in entries:
        h.update(f"{ident}\0{size}\n".encode())
    return {"digest": h.hexdigest()[:32], "files": len(entries)}


def open_dataset(spec: str, role: str, key: str):
    """`spec` is a directory (ImageFolder), a .rec file, `demo` or `demo-pretrain`."""
    from . import demo

    if spec in demo.DEMO_SETS:
        return demo.dataset(spec, role)
    if spec.endswith(".rec"):
        return RecordFile(spec)
    if os.path.isdir(spec):
        return ImageFolder(spec)
    if not os.path.exists(spec):
        raise DataError(f"{key}: {spec}: no such file or directory")
    raise DataError(f"{key}: {spec}: expected an ImageFolder directory, a .rec file or 'demo'")


def open_training_sets(data_cfg, model_classes, holdout_by_position: bool = False):
    """(train set, val set or None, class names or None, number of classes) for a job: the
    training set defines the classes, data.val is mapped onto them by name, data.val_split
    holds a seeded share of data.train out of training (`split_holdout`)."""
    from . import classes

    train = open_dataset(data_cfg.train, "train", "data.train")
    names, num_classes = classes.training_classes(train, model_classes)
    val = None
    if data_cfg.val_split:
        train, val = split_holdout(train, data_cfg.val_split, data_cfg.seed, by_position=holdout_by_position)
    elif data_cfg.val:
        val = open_dataset(data_cfg.val, "val", "data.val")
        classes.map_validation(val, names, num_classes)
    return train, val, names, num_classes


def resolve_model_classes(cfg) -> int:
    """Set `model.classes: auto` to data.train's number of classes (and check an explicit one),
    for commands that build the model without training (plan, the benchmark's baseline)."""
    from . import classes

    _, cfg.model.classes = classes.training_classes(open_dataset(cfg.data.train, "train", "data.train"),
                                                    cfg.model.classes)
    return cfg.model.classes


# --- transforms ------------------------------------------------------------------------------


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == h and img.shape[1] == w:
        return img
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BILINEAR))


class Transform:
    """uint8 HWC image -> normalised float32 CHW of size image_size.

    Evaluation and un-augmented training: resize the short side, centre crop. Augmented
    training: random resized crop and horizontal flip, drawn from a generator seeded by
    (seed, epoch, sample index), so the result depends neither on world size nor on resume."""

    def __init__(self, image_size: int, mean, std, augment: bool, seed: int):
        self.size = image_size
        self.mean = np.array(mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.std = np.array(std, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.augment = augment
        self.seed = seed

    def __call__(self, img: np.ndarray, epoch: int, index: int) -> np.ndarray:
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        s = self.size
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            h, w = img.shape[:2]
            area = h * w * rng.uniform(0.5, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch = int(min(h, max(1, round(np.sqrt(area / ratio)))))
            cw = int(min(w, max(1, round(np.sqrt(area * ratio)))))
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            img = _resize(img[y0:y0 + ch, x0:x0 + cw], s, s)
            if rng.random() < 0.5:
                img = img[:, ::-1]
        else:
            h, w = img.shape[:2]
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            img = _resize(img, nh, nw)
            y0, x0 = (nh - s) // 2, (nw - s) // 2
            img = img[y0:y0 + s, x0:x0 + s]
        chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
        return (chw - self.mean) / self.std


# --- batches ---------------------------------------------------------------------------------


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
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None

    def _sample(self, i: int, epoch: int) -> np.ndarray:
        return self.transform(self.dataset.read(int(i)), epoch, int(i))

    def _try_sample(self, i: int, epoch: int):
        try:
            return self._sample(i, epoch)
        except DataError as exc:
            return exc

    def batch(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pool is not None and len(indices) > 1:
            xs = list(self._pool.map(lambda i: self._try_sample(i, epoch), indices))
        else:
            xs = [self._try_sample(i, epoch) for i in indices]
        labels = self.dataset.labels[indices].copy()
        self.seen += len(xs)
        bad = [k for k, x in enumerate(xs) if isinstance(x, DataError)]
        if bad:
            self.bad += len(bad)
            self.bad_files.update(int(indices[k]) for k in bad)
            if len(self.bad_files) > self.bad_limit:
                raise DataError(f"data.max_bad_fraction: {len(self.bad_files)} unreadable files, more than the "
                                f"{self.bad_limit} allowed of {len(self.dataset)}; latest: {xs[bad[-1]]}")
            if len(bad) == len(xs):
                raise DataError(f"every file of a batch is unreadable; latest: {xs[bad[-1]]}")
            good = next(k for k, x in enumerate(xs) if not isinstance(x, DataError))
            for k in bad:
                xs[k], labels[k] = xs[good], labels[good]
        return np.stack(xs), labels

    def iterate(self, batches: list[tuple[int, np.ndarray]], epoch: int, skip=None) -> Iterator:
        """Yields (step, indices, x, y) for `batches` = [(step, indices)], prefetching on a
        thread. `skip(indices)` true: x is None (e.g. the feature cache holds the batch)."""
        def make(step, idx):
            if skip is not None and skip(idx):
                return step, idx, None, self.dataset.labels[idx]
            return (step, idx, *self.batch(idx, epoch))

        if self.workers == 0:
            for step, idx in batches:
                yield make(step, idx)
            return
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce():
            try:
                for step, idx in batches:
                    if stop.is_set():
                        return
                    q.put(make(step, idx))
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
