"""How distft writes a file that must never be seen half-written: the one atomic write (a
temporary file beside it, fsync, rename over it, fsync of the folder), and file digests."""
from __future__ import annotations

import hashlib
import json
import os


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    try:
        fsync_file(path)
    except OSError:
        pass  # some file systems cannot fsync a directory


def commit(tmp: str, path: str) -> None:
    """Put the finished file `tmp` (in the same folder) in place of `path`, durably: fsync, rename,
    fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then `commit` it over `path`: a crash leaves the old file or the new
    one, never a torn one."""
    tmp = f"{os.path.dirname(path) or '.'}/.{os.path.basename(path)}.tmp-{os.getpid()}"
    try:
        write(tmp)
        commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, doc, **dump_args) -> None:
    """`doc` as JSON at `path`, written atomically (`dump_args` go to json.dump)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(doc, fh, **dump_args)

    atomic_write(path, write)


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
