"""What most tests need: the repository's root, a "pretrained" backbone, small job configs, and
`python -m distft` run the way a user runs it (optionally under a launcher)."""
import json
import os
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Open MPI refuses to run as root without these (CI runs as root)
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONUNBUFFERED": "1"}


def make_pretrained(path, name="resnet18_v2", classes=5, image_size=32, seed=1):
    """A "pretrained" file: random weights, and BN statistics that are not the 0/1 defaults,
    so a test can tell if anything moved them."""
    from distft.models import gluon, network
    from types import SimpleNamespace

    net = network.create(SimpleNamespace(name=name, classes=classes, pretrained=False,
                                       image_size=image_size, head="output"), mx.cpu(), seed)
    rng = np.random.default_rng(seed)
    for pname, p in gluon.structural_params(net).items():
        if pname.endswith("running_mean"):
            p.set_data(mx.nd.array(rng.normal(0, 0.1, p.shape)))
        elif pname.endswith("running_var"):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
    net.save_parameters(str(path))
    return str(path)


def pretrain_backbone(out_dir, epochs=2):
    """A real "pretrained" backbone: a short run of our trainer on digits 0-4, so BatchNorm
    statistics describe real activations (a random net's do not, and its gradients explode)."""
    from distft.config import load_config
    from distft.distributed.world import LocalWorld
    from distft.train.run import run

    cfg = load_config(os.path.join(ROOT, "configs", "demo-pretrain.yaml"),
                      [f"train.epochs={epochs}", f"train.output={out_dir}", "data.val=null",
                       "train.log_every=100", "optimizer.warmup_steps=2", "metrics.port=0"])
    run(cfg, LocalWorld())
    return os.path.join(str(out_dir), "model.params")


def write_config(path, doc):
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh)
    return str(path)


def small_config(tmp_path, pretrained, **sections):
    """A quick job on the demo digits: resnet18_v2 at 32x32, a few steps."""
    doc = {
        "model": {"name": "resnet18_v2", "classes": 5, "pretrained": pretrained, "image_size": 32},
        "freeze": {"trainable": ["output"]},
        "data": {"train": "demo", "val": None, "batch_size": 8, "workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        "train": {"epochs": 1, "max_steps": 3, "output": str(tmp_path / "out"), "log_every": 1},
        "metrics": {"port": 0, "report": False},
    }
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    return doc


def run_cli(args, timeout=300, env=None, launcher=None, cwd=ROOT):
    """Run `python -m distft ARGS`, optionally under a launcher prefix (horovodrun ...)."""
    cmd = (launcher or []) + [sys.executable, "-m", "distft"] + list(args)
    full_env = {**os.environ, **MPI_ENV, **(env or {})}
    if cwd != ROOT:  # distft itself must still be importable from elsewhere
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, full_env.get("PYTHONPATH")) if p)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    proc.elapsed = time.monotonic() - start
    return proc


def horovodrun(np_, backend):
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return [exe, "-np", str(np_), f"--{backend}"]


def kustomize(overlay):
    """The objects `kubectl kustomize k8s/overlays/OVERLAY` renders."""
    kubectl = os.path.join(os.path.dirname(sys.executable), "kubectl")
    out = subprocess.run([kubectl, "kustomize", os.path.join(ROOT, "k8s", "overlays", overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def read_summary(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as fh:
        return json.load(fh)


def load_params(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def assert_same_weights(path, reference, tol=1e-5):
    """Every tensor of `path` within `tol` of `reference`'s, relative to the tensor's scale (float32
    sums in another order: 1e-5 absolute is ~50 ulps of a weight of 1.7)."""
    got, want = load_params(path), load_params(reference)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol * float(np.abs(want[k]).max()), err_msg=k)
