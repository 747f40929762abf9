"""model.pretrained: true: the model-zoo download, against a local server serving a zoo-style zip."""
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest

from conftest import ROOT, make_pretrained, run_cli, small_config, write_config
from distft.models import gluon, network
from distft.models import zoo
from distft.errors import ModelError

NAME = "resnet18_v2"


class ZooServer:
    """Serves `root` at 127.0.0.1 as a model-zoo mirror; counts the zip requests."""

    def __init__(self, root, delay=0.0):
        self.requests, self.started = [], []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                server.requests.append(self.path)
                server.started.append(time.time())
                time.sleep(delay)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.repo = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    """A zoo-style `<name>-<short hash>.zip` holding a 1000-class resnet18_v2's params, under the
    short hash of its own SHA-1 (what tests patch in) and under the model store's (a wrong file)."""
    root = tmp_path_factory.mktemp("mirror")
    params = root / "net.params"
    make_pretrained(params, NAME, classes=1000, image_size=32, seed=7)
    sha1 = zoo.sha1_of(str(params))
    (root / "gluon" / "models").mkdir(parents=True)
    for short in (sha1[:8], zoo.expected_sha1(NAME)[:8]):
        with zipfile.ZipFile(root / "gluon" / "models" / f"{NAME}-{short}.zip", "w") as zf:
            zf.write(params, f"{NAME}-{short}.params")
    return SimpleNamespace(root=root, params=str(params), sha1=sha1)


@pytest.fixture
def mirror(zoo_file, tmp_path, monkeypatch):
    server = ZooServer(zoo_file.root)
    monkeypatch.setenv("MXNET_GLUON_REPO", server.repo)
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxhome"))
    yield server
    server.close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_files(home):
    models = os.path.join(home, "models")
    return sorted(f for f in os.listdir(models) if not f.endswith(".lock")) if os.path.isdir(models) else []


def test_download_fills_the_cache_and_the_model_loads_it(mirror, zoo_file, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "expected_sha1", lambda name: zoo_file.sha1)
    net = network.create(SimpleNamespace(name=NAME, classes=4, pretrained=True, image_size=32, head="output"),
                       mx.cpu(), 0)
    assert mirror.requests == [f"/gluon/models/{zoo.file_name(NAME)}.zip"]
    path = str(tmp_path / "mxhome" / "models" / f"{zoo.file_name(NAME)}.params")
    assert zoo.sha1_of(path) == zoo_file.sha1
    want = mx.nd.load(zoo_file.params)["features.0.gamma"].asnumpy()
    assert np.array_equal(gluon.structural_params(net)["features.0.gamma"].data().asnumpy(), want)
    assert gluon.structural_params(net)["output.weight"].shape == (4, 512)
    assert zoo.fetch(NAME) == path and len(mirror.requests) == 1  # cached: no second request


def test_two_processes_of_one_node_download_once(zoo_file, tmp_path):
    """Two processes sharing one MXNET_HOME (the ranks of a node) ask at the same time: one
    downloads, the other waits on the lock and finds the file."""
    server = ZooServer(zoo_file.root, delay=3.0)  # slow: the second process arrives mid-download
    script = ("import sys, time; from distft.models import zoo; zoo.expected_sha1 = lambda name: sys.argv[1]; "
              f"print(time.time()); print(zoo.fetch({NAME!r}))")
    env = {**os.environ, "MXNET_GLUON_REPO": server.repo, "MXNET_HOME": str(tmp_path / "mxhome"),
           "PYTHONPATH": ROOT}
    try:
        procs = [subprocess.Popen([sys.executable, "-c", script, zoo_file.sha1], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        server.close()
    assert [p.returncode for p in procs] == [0, 0], outs
    entered = [float(out.split()[0]) for out, _ in outs]
    assert max(entered) < server.started[0] + 3.0  # both asked while the download was under way
    assert {out.split()[1] for out, _ in outs} == {str(tmp_path / "mxhome" / "models" /
                                                       f"{NAME}-{zoo_file.sha1[:8]}.params")}
    assert len(server.requests) == 1
    assert sum("downloading" in err for _, err in outs) == 1


def test_wrong_hash_is_one_line_and_not_kept(mirror, tmp_path):
    # the mirror's file is not the real resnet18_v2: the model store's SHA-1 rejects it
    with pytest.raises(ModelError) as err:
        zoo.fetch(NAME)
    msg = str(err.value)
    assert "\n" not in msg and mirror.repo in msg and zoo.expected_sha1(NAME) in msg and "not kept" in msg
    assert cache_files(tmp_path / "mxhome") == []


def test_damaged_cached_file_is_replaced(mirror, zoo_file, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "expected_sha1", lambda name: zoo_file.sha1)
    target = tmp_path / "mxhome" / "models" / f"{zoo.file_name(NAME)}.params"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert zoo.fetch(NAME) == str(target)
    assert zoo.sha1_of(str(target)) == zoo_file.sha1 and len(mirror.requests) == 1


def test_offline_names_the_url_and_the_cache_path(tmp_path, monkeypatch):
    repo = f"http://127.0.0.1:{closed_port()}/mirror"
    monkeypatch.setenv("MXNET_GLUON_REPO", repo)
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        network.create(SimpleNamespace(name=NAME, classes=5, pretrained=True, image_size=32, head="output"),
                     mx.cpu(), 0)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{repo}/gluon/models/{zoo.file_name(NAME)}.zip" in msg
    assert f"{tmp_path}/models/{zoo.file_name(NAME)}.params" in msg
    assert cache_files(tmp_path) == []


def test_offline_training_exits_2_with_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, True))
    proc = run_cli(["train", "--config", cfg], env={"MXNET_GLUON_REPO": f"http://127.0.0.1:{closed_port()}/",
                                                    "MXNET_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distft: error: model.pretrained: cannot download http://127.0.0.1:")
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "model.params")


def test_hand_placed_file_with_the_right_hash_is_used_offline(zoo_file, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "expected_sha1", lambda name: zoo_file.sha1)
    monkeypatch.setenv("MXNET_GLUON_REPO", f"http://127.0.0.1:{closed_port()}/")
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    with open(zoo_file.params, "rb") as src, open(zoo.cache_path(NAME), "wb") as dst:
        dst.write(src.read())
    net = network.create(SimpleNamespace(name=NAME, classes=3, pretrained=True, image_size=32, head="output"),
                       mx.cpu(), 0)
    assert gluon.structural_params(net)["output.weight"].shape == (3, 512)


def test_a_model_without_zoo_weights_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="model zoo has no pretrained weights for 'resnet18_v2x'"):
        zoo.fetch("resnet18_v2x")
