"""`distft bench --data-only`: the job's training loader against MXNet's own `ImageRecordIter`
on the same images, the same crop, flip and thread count, one pass each, in one process.

distft's side is what training runs: `BatchLoader` over data.train with the job's transform
(augmentation as configured), data.batch_size samples per batch, `--threads` workers. MXNet's
side is `mx.io.ImageRecordIter` (OpenCV and libjpeg-turbo in C++) with `preprocess_threads` =
`--threads` on the same images as a .rec (data.train itself when it is one; else a temporary one
written by `make-rec`, the files' bytes unchanged): with data.augment, its random resized crop
(area 0.5-1, aspect 3/4-4/3) and mirror; without, the short side resized and the centre cropped.
Both normalise to float32. Repeats alternate the two; each figure is the median of its passes."""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from distft.config import load_config
from distft.data import imaging
from distft.data.datasets import ImageFolder, RecordFile
from distft.data.loader import BatchLoader
from distft.data.makerec import make_rec
from distft.data.sets import open_dataset
from distft.data.transforms import Transform
from distft.errors import DistftError


def distft_pass(cfg, dataset, threads: int) -> float:
    """Seconds for one pass of the job's training loader over `dataset`."""
    transform = Transform(cfg.model.image_size, cfg.data.mean, cfg.data.std, cfg.data.augment, cfg.data.seed)
    loader = BatchLoader(dataset, transform, workers=threads)
    order = np.random.default_rng(cfg.data.seed).permutation(len(dataset))
    batches = [(k, order[i:i + cfg.data.batch_size]) for k, i in enumerate(range(0, len(order), cfg.data.batch_size))]
    start = time.perf_counter()
    for _ in loader.iterate(batches, epoch=0):
        pass
    seconds = time.perf_counter() - start
    loader.close()
    return seconds


def recorditer(cfg, rec: str, threads: int):
    import mxnet as mx

    size = cfg.model.image_size
    mean = [255.0 * m for m in cfg.data.mean]
    std = [255.0 * s for s in cfg.data.std]
    common = dict(path_imgrec=rec, path_imgidx=os.path.splitext(rec)[0] + ".idx", data_shape=(3, size, size),
                  batch_size=cfg.data.batch_size, shuffle=True, seed=cfg.data.seed, preprocess_threads=threads,
                  mean_r=mean[0], mean_g=mean[1], mean_b=mean[2], std_r=std[0], std_g=std[1], std_b=std[2],
                  inter_method=1, round_batch=False, dtype="float32")
    if cfg.data.augment:
        return mx.io.ImageRecordIter(random_resized_crop=True, min_random_area=0.5, max_random_area=1.0,
                                     min_aspect_ratio=3 / 4, max_aspect_ratio=4 / 3, rand_mirror=True, **common)
    return mx.io.ImageRecordIter(resize=size, **common)


def recorditer_pass(it) -> float:
    it.reset()
    start = time.perf_counter()
    for batch in it:
        batch.data[0].wait_to_read()
    return time.perf_counter() - start


def run(config: str, overrides: list, threads: int, repeats: int = 3) -> dict:
    if threads < 1 or repeats < 1:
        raise DistftError(f"bench: --threads {threads} and --repeats {repeats} must be at least 1")
    cfg = load_config(config, overrides)
    imaging.self_test()
    dataset = open_dataset(cfg.data.train, "train", "data.train")
    work = None
    try:
        if isinstance(dataset, RecordFile):
            rec = dataset.path
        elif isinstance(dataset, ImageFolder):
            work = tempfile.mkdtemp(prefix="distft-databench-")
            rec = os.path.join(work, "train.rec")
            made = make_rec(dataset.root, rec)
            if made["skipped"]:
                raise DistftError(f"bench: {len(made['skipped'])} unreadable images in data.train; "
                                  f"first: {made['skipped'][0]}")
        else:
            raise DistftError(f"bench: --data-only needs data.train as a folder or a .rec, not {cfg.data.train!r}")
        it = recorditer(cfg, rec, threads)
        recorditer_pass(it)  # warm-up: page cache, thread start-up, OpenCV's first allocations
        distft_pass(cfg, dataset, threads)
        times = {"distft": [], "recorditer": []}
        for k in range(repeats):  # alternate which goes first
            for name in (("distft", "recorditer") if k % 2 == 0 else ("recorditer", "distft")):
                times[name].append(distft_pass(cfg, dataset, threads) if name == "distft" else recorditer_pass(it))
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    n = len(dataset)
    rates = {name: n / statistics.median(t) for name, t in times.items()}
    return {"data_only": {"threads": threads, "images": n, "image_size": cfg.model.image_size,
                          "samples_per_sec": rates}}, times


def table(result: dict, times: dict) -> str:
    d = result["data_only"]
    rates = d["samples_per_sec"]
    lines = [f"data only: {d['images']} images at {d['image_size']} px, {d['threads']} thread(s), "
             f"median of {len(times['distft'])} passes each",
             "| loader | samples/s | passes (s) |", "|---|---:|---|"]
    for name in ("distft", "recorditer"):
        lines.append(f"| {name} | {rates[name]:.1f} | {', '.join(f'{t:.2f}' for t in times[name])} |")
    lines.append(f"distft / recorditer: {rates['distft'] / rates['recorditer']:.2f}x")
    return "\n".join(lines)
