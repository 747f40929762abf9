"""`distft check`: read every image of data.train and data.val once, on all cores, and report
unreadable files, images per class and image sizes.

The bad-file rule: a data set of n files may hold up to max(data.max_bad_fraction x n,
data.max_bad_files) unreadable files (defaults 0.001 and 10: a few bad files in a small set are
reported and left out, one in a thousand in a large one). Past that, check exits 2 naming the
first bad file. Training runs the same pass before its first step (`without_unreadable`), each
rank reading a strided share: past the limit every rank stops with the same line; below it the
bad files are left out of the data set on every rank.

Verdicts are cached in a JSON file keyed by (path, size, mtime) and the decoder's identity
(`imaging.identity`), so a second check, or one after a few files changed, reads only what is
new. A file's failure is cached only once the decoder's self-test has passed in the same
process: a verdict is a fact about the file, never about a broken environment.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from distft.data import imaging, recordio
from distft.data.datasets import ImageFolder, RecordFile, Subset
from distft.data.imaging import decode
from distft.data.loader import bad_file_limit
from distft.data.sets import open_dataset, open_training_sets
from distft.errors import DataError
from distft.files import atomic_write_json

CACHE_VERSION = 2  # 1: no decoder identity (its failures may be a broken process's)
CHUNK = 64  # files per task handed to a worker process


def default_cache_path() -> str:
    root = os.environ.get("DISTFT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "distft")
    return os.path.join(root, "check.json")


# --- what a worker does ------------------------------------------------------------------------


def _verdict(payload: bytes, where: str) -> tuple[int, int, Optional[str]]:
    try:
        img = decode(payload, where)
    except DataError as exc:
        return 0, 0, str(exc)
    return int(img.shape[1]), int(img.shape[0]), None


def inspect_task(task: tuple) -> list[tuple[str, int, int, Optional[str]]]:
    """[(id, width, height, error or None)] for ("files", [path]) or ("records", rec, [(key, offset)])."""
    out = []
    if task[0] == "files":
        for path in task[1]:
            try:
                with open(path, "rb") as fh:
                    payload = fh.read()
            except OSError as exc:
                out.append((path, 0, 0, f"{path}: cannot read ({exc.strerror})"))
                continue
            out.append((path, *_verdict(payload, path)))
        return out
    _, rec, entries = task
    with open(rec, "rb") as fh:
        for key, offset in entries:
            where = f"{rec} record {key}"
            try:
                _, payload = recordio.unpack(recordio.read_record(fh, offset))
            except (ValueError, OSError) as exc:
                out.append((f"{rec}#{key}", 0, 0, f"{where}: unreadable record ({exc})"))
                continue
            out.append((f"{rec}#{key}", *_verdict(payload, where)))
    return out


# --- the verdict cache -------------------------------------------------------------------------


class VerdictCache:
    """{id: [size, mtime_ns, width, height, error]}; an entry counts only while the file's size
    and mtime are unchanged. Training ranks write `check-rank<r>.json` beside the file (no two
    writers share a file) and every reader merges them all."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.entries: dict = {}
        if not path:
            return
        stem = os.path.splitext(os.path.basename(self.path))[0]
        folder = os.path.dirname(os.path.abspath(path))
        siblings = sorted(f for f in os.listdir(folder) if f == f"{stem}.json"
                          or (f.startswith(f"{stem}-rank") and f.endswith(".json"))) if os.path.isdir(folder) else []
        for name in siblings:
            try:
                with open(os.path.join(folder, name)) as fh:
                    doc = json.load(fh)
                if doc.get("version") == CACHE_VERSION and doc.get("decoder") == imaging.identity():
                    self.entries.update(doc.get("entries", {}))
            except (OSError, ValueError, AttributeError):
                continue  # a damaged cache is rebuilt, not fatal

    def get(self, key: str, stamp: tuple[int, int]):
        entry = self.entries.get(key)
        if entry and (entry[0], entry[1]) == stamp:
            return entry[2], entry[3], entry[4]
        return None

    def put(self, key: str, stamp: tuple[int, int], width: int, height: int, error: Optional[str]) -> None:
        if error and not imaging.self_test_passed():
            return  # unproven: the decoder itself may be at fault
        self.entries[key] = [stamp[0], stamp[1], width, height, error]

    def save(self, path: Optional[str] = None) -> None:
        path = path or self.path
        if not path:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            atomic_write_json(path, {"version": CACHE_VERSION, "decoder": imaging.identity(), "entries": self.entries})
        except OSError:
            pass  # a cache that cannot be written costs a re-read next time, nothing more


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# --- one data set ------------------------------------------------------------------------------


@dataclass
class SetReport:
    key: str  # data.train / data.val
    spec: str
    kind: str
    files: int
    class_counts: dict
    unreadable: list = field(default_factory=list)  # [message]
    ignored: list = field(default_factory=list)  # paths not read (no image extension, outside class folders)
    widths: list = field(default_factory=list)
    heights: list = field(default_factory=list)
    read: int = 0  # files read now (the rest came from the cache)
    limit: int = 0
    per_class: dict = field(default_factory=dict)  # name -> {"files", "unreadable", "ignored"}

    def sizes(self) -> Optional[dict]:
        if not self.widths:
            return None
        return {"width": [min(self.widths), int(statistics.median(self.widths)), max(self.widths)],
                "height": [min(self.heights), int(statistics.median(self.heights)), max(self.heights)]}

    def to_json(self) -> dict:
        return {"key": self.key, "data": self.spec, "kind": self.kind, "files": self.files,
                "unreadable": self.unreadable, "ignored": self.ignored, "bad_file_limit": self.limit,
                "classes": self.class_counts, "per_class": self.per_class,
                "image_sizes_min_median_max": self.sizes(), "read": self.read,
                "from_cache": self.files - self.read}

    def text(self) -> str:
        lines = [f"{self.key}: {self.spec} ({self.kind}): {self.files} files, {len(self.unreadable)} unreadable "
                 f"(limit {self.limit}), {len(self.class_counts)} classes"]
        lines.append("  per class: " + ", ".join(_class_line(n, c) for n, c in self.per_class.items()))
        s = self.sizes()
        if s:
            lines.append(f"  image sizes (min / median / max): width {' / '.join(map(str, s['width']))}, "
                         f"height {' / '.join(map(str, s['height']))}")
        for message in self.unreadable:
            lines.append(f"  unreadable: {message}")
        if self.ignored:
            more = f" … and {len(self.ignored) - 3} more" if len(self.ignored) > 3 else ""
            lines.append(f"  ignored ({len(self.ignored)}: hidden, not an image file name, or outside the class "
                         "folders): " + ", ".join(self.ignored[:3]) + more)
        lines.append(f"  read {self.read} files, {self.files - self.read} verdicts from the cache")
        return "\n".join(lines)


def _class_line(name: str, row: dict) -> str:
    extra = [f"{row[k]} {k}" for k in ("unreadable", "ignored") if row[k]]
    return f"{name}: {row['files']}" + (f" ({', '.join(extra)})" if extra else "")


def class_counts(dataset) -> dict:
    names = dataset.class_names
    counts = np.bincount(dataset.labels, minlength=len(names) if names else 0)
    return {(names[i] if names and i < len(names) else str(i)): int(c) for i, c in enumerate(counts)}


def class_table(dataset, bad_positions) -> dict:
    """Per class of a whole data set (an ImageFolder or RecordFile): the image files it holds,
    how many of them are unreadable (`bad_positions`: sample positions) and how many files in
    its folders are not read (hidden, or not an image file name)."""
    counts = class_counts(dataset)
    bad = np.bincount(dataset.labels[sorted(bad_positions)].astype(np.int64), minlength=len(counts)) \
        if len(bad_positions) else np.zeros(len(counts), dtype=np.int64)
    ignored = getattr(dataset, "ignored_per_class", {})
    return {name: {"files": n, "unreadable": int(bad[i]), "ignored": ignored.get(name, 0)}
            for i, (name, n) in enumerate(counts.items())}


def _tasks(dataset) -> list[tuple[str, tuple[int, int], tuple]]:
    """[(id, stamp, what to read)] for every file or record of `dataset`."""
    if isinstance(dataset, ImageFolder):
        return [(p, _stamp(p), ("files", p)) for p in dataset.files]
    stamp = _stamp(dataset.path)
    idx = os.path.splitext(dataset.path)[0] + ".idx"
    return [(f"{dataset.path}#{key}", stamp, ("record", key, off)) for key, off in recordio.read_index(idx)]


def _verdicts(dataset, items, cache: VerdictCache, pool) -> tuple[dict, int]:
    """{id: (width, height, error)} for `items` of `dataset`, reading what the cache lacks;
    and how many were read."""
    kind = "ImageFolder" if isinstance(dataset, ImageFolder) else "RecordIO"
    todo, verdicts = [], {}
    for ident, stamp, what in items:
        hit = cache.get(ident, stamp)
        if hit is None:
            todo.append((ident, stamp, what))
        else:
            verdicts[ident] = hit
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    tasks = [("files", [w[1] for _, _, w in c]) if kind == "ImageFolder" else
             ("records", dataset.path, [(w[1], w[2]) for _, _, w in c]) for c in chunks]
    results = pool.map(inspect_task, tasks) if pool is not None and len(tasks) > 1 else map(inspect_task, tasks)
    stamps = {ident: stamp for ident, stamp, _ in todo}
    for chunk in results:
        for ident, width, height, error in chunk:
            verdicts[ident] = (width, height, error)
            cache.put(ident, stamps[ident], width, height, error)
    return verdicts, len(todo)


def scan(dataset, key: str, spec: str, cache: VerdictCache, pool, max_bad_fraction: float,
         max_bad_files: int) -> SetReport:
    kind = "ImageFolder" if isinstance(dataset, ImageFolder) else "RecordIO"
    report = SetReport(key, spec, kind, len(dataset), class_counts(dataset),
                       limit=bad_file_limit(len(dataset), max_bad_fraction, max_bad_files))
    report.ignored = list(getattr(dataset, "ignored", []))
    items = _tasks(dataset)
    verdicts, report.read = _verdicts(dataset, items, cache, pool)
    bad = []
    for position, (ident, _, _) in enumerate(items):
        width, height, error = verdicts[ident]
        if error:
            report.unreadable.append(error)
            bad.append(position)
        else:
            report.widths.append(width)
            report.heights.append(height)
    report.per_class = class_table(dataset, bad)
    return report


def check(cfg, jobs: int = 0, cache_path: Optional[str] = None) -> list[SetReport]:
    """Reports for data.train and data.val (or data.train alone, data.val_split included)."""
    imaging.self_test()  # a broken decoder is the environment's fault: say so, read no file
    open_training_sets(cfg.data, cfg.model.classes)  # class errors first: one line, naming the key
    sets = [("data.train", cfg.data.train)] + ([("data.val", cfg.data.val)] if cfg.data.val else [])
    cache = VerdictCache(cache_path or default_cache_path())
    jobs = jobs or os.cpu_count() or 1
    pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None
    try:
        reports = [scan(open_dataset(spec, key.split(".")[1], key), key, spec, cache, pool,
                        cfg.data.max_bad_fraction, cfg.data.max_bad_files) for key, spec in sets]
    finally:
        if pool is not None:
            pool.shutdown()
    cache.save()
    return reports


def verdict(reports: list[SetReport]) -> None:
    """The training rule: more unreadable files than the limit is an error naming the first."""
    for r in reports:
        if len(r.unreadable) > r.limit:
            raise DataError(f"{r.key}: {len(r.unreadable)} unreadable files of {r.files}, more than the {r.limit} "
                            f"allowed (max(data.max_bad_fraction x files, data.max_bad_files)); first: "
                            f"{r.unreadable[0]}")


def main(cfg, jobs: int = 0, cache_path: Optional[str] = None, as_json: bool = False) -> int:
    start = time.perf_counter()
    reports = check(cfg, jobs, cache_path)
    if as_json:
        print(json.dumps([r.to_json() for r in reports], indent=1))
    else:
        print("\n".join(r.text() for r in reports))
        print(f"checked in {time.perf_counter() - start:.1f} s")
    verdict(reports)
    return 0


# --- before training ---------------------------------------------------------------------------


def without_unreadable(dataset, key: str, world, data_cfg, cache_path: Optional[str] = None, log=print,
                       per_class: Optional[dict] = None):
    """The pass training runs before any GPU time is spent: each rank reads its strided share of
    the files (verdicts cached), the ranks exchange what they found, and every rank either
    stops with the same one-line error (more bad files than the limit) or continues with a view
    of `dataset` that leaves the bad files out. `per_class`, when given, receives the whole data
    set's `class_table` (files, unreadable, ignored per class)."""
    base, view = (dataset.base, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    if not isinstance(base, (ImageFolder, RecordFile)):
        return dataset
    items = _tasks(base)
    mine = items[world.rank::world.size]
    cache = VerdictCache(cache_path or default_cache_path())
    workers = max(1, data_cfg.workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts, read = _verdicts(base, mine, cache, pool if workers > 1 else None)
    if read:
        stem, ext = os.path.splitext(cache.path)
        cache.save(f"{stem}-rank{world.rank}{ext}")
    position = {ident: i for i, (ident, _, _) in enumerate(items)}
    found = {position[ident]: v[2] for ident, v in verdicts.items() if v[2]}
    gathered = world.allgather_json(sorted(found.items()), f"distft.check.{key}")
    bad = {int(i): message for part in gathered for i, message in part}
    if per_class is not None:
        per_class.update(class_table(base, list(bad)))
    # the rule holds for the whole set of files: all of data.train when data.val_split took a view
    limit = bad_file_limit(len(items), data_cfg.max_bad_fraction, data_cfg.max_bad_files)
    if len(bad) > limit:
        where = key if view is None else "data.train"
        raise DataError(f"{where}: {len(bad)} unreadable files of {len(items)}, more than the {limit} allowed "
                        f"(max(data.max_bad_fraction x files, data.max_bad_files)); first: {bad[min(bad)]}")
    in_use = set(range(len(items))) if view is None else {int(i) for i in view}
    bad = {i: m for i, m in bad.items() if i in in_use}
    if not bad:
        return dataset
    log(f"warning: {key}: {len(bad)} unreadable file(s) of {len(in_use)} left out (limit {limit}): "
        + "; ".join(bad[i] for i in sorted(bad)[:3]) + (" …" if len(bad) > 3 else ""))
    keep = np.array([i for i in range(len(dataset)) if (i if view is None else int(view[i])) not in bad])
    return Subset(dataset, keep, getattr(dataset, "name", key))
