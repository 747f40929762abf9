"""`distft make-rec`: an ImageFolder as an indexed RecordIO file, without OpenCV.

Writes OUT.rec and OUT.idx (MXNet's format, as im2rec writes them: an IRHeader with the label,
then the encoded image) and OUT.classes.json (the class names, index = label). Worker processes
read (and with --resize, re-encode with Pillow) the images; one writer appends them in order.
Images Pillow cannot read are reported and left out.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from distft.data import imaging
from distft.data.datasets import ImageFolder, class_names_path
from distft.data.imaging import decode
from distft.errors import DataError
from distft.files import atomic_write_json, commit

CHUNK = 32


def _encode(task: tuple) -> list[tuple[int, bytes | None, str | None]]:
    """[(position, encoded image or None, error)] for a chunk of (position, path)."""
    items, resize, quality = task
    out = []
    for pos, path in items:
        try:
            with open(path, "rb") as fh:
                payload = fh.read()
        except OSError as exc:
            out.append((pos, None, f"{path}: cannot read ({exc.strerror})"))
            continue
        try:
            img = decode(payload, path)  # every image is proven readable before it is stored
        except DataError as exc:
            out.append((pos, None, str(exc)))
            continue
        if resize:
            h, w = img.shape[:2]
            scale = resize / min(h, w)
            small = imaging.Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                        imaging.Image.BILINEAR)
            payload = imaging.encode_jpeg(np.asarray(small), quality)
        out.append((pos, payload, None))
    return out


def make_rec(folder: str, out: str, resize: int = 0, quality: int = 95, jobs: int = 0) -> dict:
    import mxnet as mx

    if not out.endswith(".rec"):
        raise DataError(f"{out}: the output name must end in .rec")
    imaging.self_test()  # a broken decoder would skip every image as unreadable
    dataset = ImageFolder(folder)
    empty = [n for i, n in enumerate(dataset.class_names) if not (dataset.labels == i).any()]
    if empty:
        raise DataError(f"{folder}: class folders without images: {', '.join(empty)} (remove them or add images)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    items = list(enumerate(dataset.files))
    tasks = [(items[i:i + CHUNK], resize, quality) for i in range(0, len(items), CHUNK)]
    jobs = jobs or os.cpu_count() or 1
    idx = os.path.splitext(out)[0] + ".idx"
    tmp_rec, tmp_idx = f"{out}.tmp-{os.getpid()}", f"{idx}.tmp-{os.getpid()}"
    writer = mx.recordio.MXIndexedRecordIO(tmp_idx, tmp_rec, "w")
    skipped, written = [], 0
    pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 and len(tasks) > 1 else None
    try:
        results = pool.map(_encode, tasks) if pool is not None else map(_encode, tasks)
        for chunk in results:  # in order: record keys are file positions
            for pos, payload, error in chunk:
                if payload is None:
                    skipped.append(error)
                    continue
                header = mx.recordio.IRHeader(0, float(dataset.labels[pos]), pos, 0)
                writer.write_idx(pos, mx.recordio.pack(header, payload))
                written += 1
    except BaseException:
        writer.close()
        for path in (tmp_rec, tmp_idx):  # no half-written data set left behind
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    writer.close()
    commit(tmp_rec, out)
    commit(tmp_idx, idx)
    names_path = class_names_path(out)
    atomic_write_json(names_path, dataset.class_names, indent=0)
    return {"rec": out, "idx": idx, "classes_file": names_path, "records": written,
            "classes": dataset.class_names, "skipped": skipped}
