"""Data sets: (H, W, 3) uint8 RGB images and integer labels. An ImageFolder (one sub-folder per
class), an indexed RecordIO file, and a Subset (a view of some samples of either)."""
from __future__ import annotations

import json
import os
import threading
import unicodedata
from typing import Optional

import numpy as np

from distft.data import recordio
from distft.data.imaging import IMAGE_EXTENSIONS, Encoded, decode
from distft.errors import DataError



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

    def encoded(self, i: int) -> Encoded:
        """Sample i's file bytes, undecoded (the transform decodes only what its crop needs)."""
        try:
            with open(self.files[i], "rb") as fh:
                return Encoded(fh.read(), self.files[i])
        except OSError as exc:
            raise DataError(f"{self.files[i]}: cannot read ({exc.strerror})") from None

    def read(self, i: int) -> np.ndarray:
        return decode(*self.encoded(i))


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

    def encoded(self, i: int) -> Encoded:
        import mxnet as mx

        where = f"{self.path} record {self.keys[i]}"
        try:
            _, payload = mx.recordio.unpack(self._reader().read_idx(self.keys[i]))
        except (mx.base.MXNetError, ValueError, OSError) as exc:
            raise DataError(f"{where}: unreadable record ({exc})") from None
        return Encoded(payload, where)

    def read(self, i: int) -> np.ndarray:
        return decode(*self.encoded(i))


def class_names_path(rec_path: str) -> str:
    """Where the class names of a RecordIO file live: `<name>.classes.json` beside it."""
    return os.path.splitext(rec_path)[0] + ".classes.json"


def read_names_file(path: str, error: type = DataError, unreadable: str = "cannot read class names",
                    keyed: bool = False, nonempty: bool = False) -> Optional[list]:
    """The class names a JSON file lists (index = label), in NFC; None without the file. `keyed`:
    `{"classes": [...]}` is read too; `nonempty`: an empty list is an error. Errors are `error`,
    naming the file."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: {unreadable} ({exc})") from None
    names = doc.get("classes") if keyed and isinstance(doc, dict) else doc
    if not isinstance(names, list) or (nonempty and not names) or not all(isinstance(n, str) for n in names):
        raise error(f"{path}: expected a JSON list of class names (index = label)")
    return [nfc(n) for n in names]


def read_class_names(rec_path: str) -> Optional[list]:
    return read_names_file(class_names_path(rec_path))


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

    def encoded(self, i: int) -> Encoded:
        return self.base.encoded(int(self.indices[i]))


