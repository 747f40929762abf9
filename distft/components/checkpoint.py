"""Checkpoints that cannot be half-written and never need pickle.

Layout under <train.output>/checkpoints/:
    ckpt-00000120/
        trainable.params   trainable weights and moving BN statistics (mx.nd.save format)
        optimizer.params   optimizer state leaves, keyed <param>#<leaf>   (mx.nd.save format)
        meta.json          the train state (epoch, samples into it, step, global batch, world size),
                           the job's identity keys, update counts, loss scale, sha256 of both files
A checkpoint is written to a hidden temporary directory, fsynced, then renamed into place, so a
crash leaves either the previous checkpoint set or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import mxnet as mx

from distft.errors import CheckpointError, mxnet_reason
from distft.files import file_digest, fsync_dir, fsync_file
from distft.runfolder import RunFolder

FORMAT_VERSION = 2  # 2: the train state in samples, the job identity, the loss scale
READABLE_FORMATS = (1, 2)
_NAME = re.compile(r"^ckpt-(\d{8})$")


@dataclass
class Checkpoint:
    path: str
    meta: dict
    params: dict  # structural name -> NDArray
    optimizer: dict  # "<param>#<leaf>" -> NDArray


def list_checkpoints(output: str) -> list[str]:
    root = RunFolder(output).checkpoints
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n))
    return [os.path.join(root, n) for n in names]


def save(output: str, step: int, params: dict, optimizer: dict, meta: dict, keep: int) -> str:
    root = RunFolder(output).checkpoints
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"ckpt-{step:08d}")
    tmp = os.path.join(root, f".tmp-ckpt-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files = {}
        for fname, arrays in (("trainable.params", params), ("optimizer.params", optimizer)):
            path = os.path.join(tmp, fname)
            mx.nd.save(path, dict(arrays))
            fsync_file(path)
            files[fname] = file_digest(path)
        doc = {"format": FORMAT_VERSION, "step": step, **meta, "files": files}
        meta_path = os.path.join(tmp, "meta.json")
        with open(meta_path, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if os.path.exists(final):  # the same step written again (e.g. after a resume)
            aside = final + f".old-{os.getpid()}"
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str) -> Checkpoint:
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS or "files" not in meta:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format")
    loaded = {}
    for fname, want in meta["files"].items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{fpath}: missing")
        got = file_digest(fpath)
        if got != want:
            raise CheckpointError(f"{fpath}: checksum mismatch (corrupt or modified): "
                                  f"sha256 {got[:12]}… != recorded {want[:12]}…")
        try:
            loaded[fname] = mx.nd.load(fpath)
        except mx.base.MXNetError as exc:
            raise CheckpointError(f"{fpath}: unreadable ({mxnet_reason(exc)})") from None
    return Checkpoint(path=path, meta=meta, params=loaded.get("trainable.params", {}),
                      optimizer=loaded.get("optimizer.params", {}))


SKIPPING = "skipping checkpoint: "


def latest(output: str, warn=print, since: Optional[float] = None) -> Optional[Checkpoint]:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped. `since`:
    only checkpoints written at or after that wall time (a job that started over in this folder)."""
    for path in reversed(list_checkpoints(output)):
        if since is not None and os.path.getmtime(path) < since:
            continue
        try:
            return load(path)
        except CheckpointError as exc:
            warn(f"{SKIPPING}{exc}")
    return None
