"""`distft predict`: top-k class names with probabilities for images or folders of images.

Images are decoded on `data.workers` threads and run in batches of data.val_batch_size (or
data.batch_size), with the run's own preprocessing. Under a launcher (horovodrun, mpirun, srun)
each rank takes a strided share of the images and rank 0 writes every result, in input order. An unreadable image does not stop the rest:
it gets `{"image": path, "error": reason}` (JSON) or a row with empty rank/class/prob (CSV)."""
from __future__ import annotations

import csv
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import mxnet as mx
import numpy as np

from distft.data.datasets import is_hidden
from distft.data.imaging import IMAGE_EXTENSIONS, Encoded
from distft import precision
from distft.data import imaging
from distft.distributed.agreement import agreed_everywhere
from distft.distributed.world import init_world
from distft.errors import ConfigError, DataError
from distft.inference import trained


def collect(paths: list[str]) -> list[str]:
    """Files as given; folders walked (sorted) for image files, hidden ones (`.DS_Store`, macOS
    `._*` files, `.ipynb_checkpoints/`) left out as training leaves them out."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not is_hidden(d))
                found += [os.path.join(root, f) for f in sorted(files)
                          if f.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(f)]
        elif os.path.exists(path):
            found.append(path)
        else:
            raise DataError(f"--images: {path}: no such file or directory")
    if not found:
        raise DataError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(paths)}")
    return found


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, names: list[str], k: int) -> list[list[dict]]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": names[j], "prob": float(p[j])} for j in row] for p, row in zip(probs, order)]


def output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".csv"):
        raise ConfigError(f"--output: {path}: must end in .json or .csv")
    return ext[1:]


def write(results: list[dict], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if output_format(path) == "json":
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)
        return
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["image", "rank", "class", "prob"])
        for r in results:
            if "error" in r:
                out.writerow([r["image"], "", "", ""])
            for rank, t in enumerate(r.get("top", []), 1):
                out.writerow([r["image"], rank, t["class"], f"{t['prob']:.6g}"])


def load_image(path: str, transform):
    """An image file as the network's input (training's decoding, evaluation's crop), or the
    DataError naming it."""
    try:
        with open(path, "rb") as fh:
            payload = fh.read()
        return transform(Encoded(payload, path), 0, 0)
    except OSError as exc:
        return DataError(f"{path}: cannot read ({exc.strerror})")
    except DataError as exc:
        return exc


def run(cfg, images: list[str], output: str, k: Optional[int] = None, world=None,
        head: Optional[str] = None) -> list[dict]:
    """Top-k for every image of `images` with the run's network (`head`: a grid's head by name)."""
    output_format(output)  # refuse a bad --output before any work
    world = world or init_world(stall_timeout=cfg.train.stall_timeout)
    agreed_everywhere(world, "testing the image decoder", imaging.self_test)  # else every image is "unreadable"
    names = trained.run_classes(cfg)  # the run's classes (classes.json), model.classes: auto or not
    classes = len(names)
    k = min(5, classes) if k is None else k
    if not 1 <= k <= classes:
        raise ConfigError(f"--top-k: must be between 1 and model.classes ({classes}), got {k}")
    files = collect(images)
    ctx = world.context()
    net, _ = trained.load_network(cfg, ctx, head=head)
    runner = trained.runner(cfg, net, ctx)
    transform = trained.preprocessing(cfg).transform()
    batch = cfg.data.val_batch_size or cfg.data.batch_size

    mine = files[world.rank::world.size]
    results = []
    with ThreadPoolExecutor(max_workers=max(cfg.data.workers, 1)) as pool:
        for start in range(0, len(mine), batch):
            chunk = mine[start:start + batch]
            xs = list(pool.map(lambda path: load_image(path, transform), chunk))
            good = [i for i, x in enumerate(xs) if not isinstance(x, DataError)]
            tops = []
            if good:
                logits = precision.to_float32(runner(mx.nd.array(np.stack([xs[i] for i in good]), ctx=ctx)))
                tops = top_k(softmax(logits.asnumpy()), names, k)
            by_index = dict(zip(good, tops))
            for i, path in enumerate(chunk):
                if i in by_index:
                    results.append({"image": path, "top": by_index[i]})
                else:
                    print(f"distft: warning: {xs[i]}", file=sys.stderr, flush=True)
                    results.append({"image": path, "error": str(xs[i])})
    if world.size > 1:  # rank r holds files r, r + N, …: interleave them back into input order
        shares = world.allgather_json(results, "distft.predict")
        results = [shares[i % world.size][i // world.size] for i in range(len(files))]
    if world.rank == 0:
        write(results, output)
    bad = sum("error" in r for r in results)
    if world.rank == 0:
        print(f"predict: {len(results) - bad} images, {bad} unreadable; top-{k} written to {output}"
              + (f" ({world.size} ranks)" if world.size > 1 else ""), flush=True)
    return results
