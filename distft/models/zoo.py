"""Model-zoo weights (`model.pretrained: true`), fetched the way MXNet's model store does.

The file is `$MXNET_HOME/models/<name>-<short hash>.params` (MXNET_HOME defaults to ~/.mxnet),
downloaded as `<repo>gluon/models/<name>-<short hash>.zip` from `$MXNET_GLUON_REPO` (a
company mirror) or Apache's bucket, and checked against the model store's SHA-1.

Differences from `model_store.get_model_file`, and why:
- One download per node. Every process of a node takes an fcntl lock beside the file; the first
  to hold it downloads, the rest find the file there when they get the lock. This runs before
  Horovod starts (no collective can stall on a slow download).
- No retries and a socket timeout: a mirror that is down gives one error line at once, naming
  the URL tried and the file to put in place by hand.
- A file with the wrong hash is never left in the cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

from distft.errors import ModelError
from distft.files import commit, file_digest
from distft.models.gluon import zoo_sha1

APACHE_REPO = "https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/"
SOCKET_TIMEOUT_S = 60.0


def expected_sha1(name: str) -> str:
    """The model store's SHA-1 of `<name>-<short hash>.params`, or a one-line error."""
    sha1 = zoo_sha1(name)
    if sha1 is None:
        raise ModelError(f"model.pretrained: true, but the model zoo has no pretrained weights for {name!r}; "
                         "give a .params path instead")
    return sha1


def file_name(name: str) -> str:
    return f"{name}-{expected_sha1(name)[:8]}"


def cache_dir() -> str:
    home = os.environ.get("MXNET_HOME") or os.path.join("~", ".mxnet")
    return os.path.expanduser(os.path.join(home, "models"))


def cache_path(name: str) -> str:
    return os.path.join(cache_dir(), file_name(name) + ".params")


def url(name: str) -> str:
    repo = os.environ.get("MXNET_GLUON_REPO") or APACHE_REPO
    if not repo.endswith("/"):
        repo += "/"
    return f"{repo}gluon/models/{file_name(name)}.zip"


def sha1_of(path: str) -> str:
    """The SHA-1 MXNet's model store names its files by."""
    return file_digest(path, "sha1")


@contextlib.contextmanager
def _node_lock(path: str):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks while another process of this node downloads
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(name: str, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
    """The verified model-zoo file for `name`, downloaded if it is missing or damaged."""
    target = cache_path(name)
    want = expected_sha1(name)
    if os.path.isfile(target) and sha1_of(target) == want:
        return target  # the usual case: no lock needed, files only ever appear by rename
    root = os.path.dirname(target)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"model.pretrained: cannot create the model cache {root} ({exc.strerror}); "
                         "set MXNET_HOME to a writable directory") from None
    with _node_lock(target + ".lock"):
        if os.path.isfile(target) and sha1_of(target) == want:
            return target  # another process of this node fetched it while we waited
        if os.path.exists(target):
            log(f"distft: {target} does not match its SHA-1; removed, downloading it again")
            os.remove(target)
        _download(name, url(name), target, want, log)
    return target


def _download(name: str, source: str, target: str, want: str, log) -> None:
    root = os.path.dirname(target)
    by_hand = f"put {os.path.basename(target)} (from that zip) at {target} by hand, or give a .params path"
    log(f"distft: downloading {source} -> {target}")
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        zip_path = os.path.join(tmp, "download.zip")
        try:
            with urllib.request.urlopen(source, timeout=SOCKET_TIMEOUT_S) as resp, open(zip_path, "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except urllib.error.HTTPError as exc:
            raise ModelError(f"model.pretrained: {source}: HTTP {exc.code} {exc.reason}; {by_hand}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ModelError(f"model.pretrained: cannot download {source} ({reason}); {by_hand}") from None
        inner = os.path.basename(target)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                if inner not in zf.namelist():
                    raise ModelError(f"model.pretrained: {source} holds no {inner} "
                                     f"(it holds {', '.join(zf.namelist()[:5]) or 'nothing'})")
                zf.extract(inner, tmp)
        except zipfile.BadZipFile:
            raise ModelError(f"model.pretrained: {source} is not a zip file; {by_hand}") from None
        extracted = os.path.join(tmp, inner)
        got = sha1_of(extracted)
        if got != want:
            raise ModelError(f"model.pretrained: {source} gave {inner} with SHA-1 {got}, expected {want} "
                             "(not kept); check MXNET_GLUON_REPO's mirror")
        commit(extracted, target)
