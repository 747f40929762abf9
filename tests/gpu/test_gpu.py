"""On a GPU (launch/gpu-smoke.sh runs these in the cu112 venv): cuDNN's BatchNorm keeps frozen
statistics bitwise, one GPU learns what the CPU learns, fp16 AMP with loss scaling learns what
float32 learns, and 2 ranks over NCCL learn what one rank with twice the batch learns.

Each skips, saying why, where MXNet sees no GPU (this machine and CI have none). NOT YET RUN ON A
GPU: the tolerances below are the stated targets, to be confirmed by the first run."""
import importlib.metadata
import json
import os
import sys

import mxnet as mx
import numpy as np
import pytest

from conftest import load_params, make_pretrained, read_summary, run_cli, small_config, write_config

pytestmark = pytest.mark.gpu
GPUS = mx.context.num_gpus()
B = 8
STEPS = 4
# stated tolerances, relative to each tensor's largest magnitude
GPU_VS_CPU = 1e-3  # cuDNN's and oneDNN's float32 convolutions sum in different orders
AMP_VS_FLOAT32 = 5e-2  # float16 activations, float32 weights and updates
NCCL_VS_ONE_RANK = 1e-3


def _mxnet_build() -> str:
    for name in ("mxnet-cu112", "mxnet-cu117", "mxnet"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "mxnet"


needs_gpu = pytest.mark.skipif(GPUS == 0, reason=f"no GPU visible to MXNet ({_mxnet_build()}: num_gpus() == 0); "
                                                   "launch/gpu-smoke.sh runs these on a GPU machine")
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, MXNet sees {GPUS}")


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    return make_pretrained(tmp_path_factory.mktemp("gpu-pre") / "pre.params")


def job(tmp_path, pre, name, trainable=("features.8", "output"), batch=B, **extra):
    doc = small_config(tmp_path, pre, freeze={"trainable": list(trainable)},
                       data={"batch_size": batch, "augment": False},
                       optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
                       train={"max_steps": STEPS, "output": str(tmp_path / name), "log_every": 1}, **extra)
    return write_config(tmp_path / f"{name}.yaml", doc)


def train(cfg, cpu=False, launcher=None):
    env = {"CUDA_VISIBLE_DEVICES": ""} if cpu else {}
    proc = run_cli(["--config", cfg], env=env, launcher=launcher, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r]


def close(a: dict, b: dict, rtol: float, names):
    for n in names:
        scale = float(np.abs(b[n]).max()) or 1.0
        np.testing.assert_allclose(a[n], b[n], rtol=rtol, atol=rtol * scale, err_msg=n)


def trained_names(params, trainable=("features.8", "output")):
    return [n for n in params if n.startswith(tuple(p + "." for p in trainable))]


@needs_gpu
def test_cudnn_batchnorm_keeps_frozen_statistics_bitwise(tmp_path, pre):
    """cuDNN updates running statistics in the forward pass: every frozen BN's must still be the
    pretrained bytes after training on the GPU (features.8's own BNs train)."""
    train(job(tmp_path, pre, "gpu"))
    summary = read_summary(tmp_path / "gpu")
    assert summary["gpu_memory_used_bytes"], "the run did not use the GPU"
    before, after = load_params(pre), load_params(tmp_path / "gpu" / "model.params")
    frozen = [n for n in before if n not in trained_names(before)]
    stats = [n for n in frozen if n.endswith(("running_mean", "running_var"))]
    assert stats, "no frozen BatchNorm in the model"
    assert [n for n in frozen if not np.array_equal(before[n], after[n])] == []


@needs_gpu
def test_one_gpu_learns_what_the_cpu_learns(tmp_path, pre):
    train(job(tmp_path, pre, "gpu"))
    train(job(tmp_path, pre, "cpu"), cpu=True)
    assert read_summary(tmp_path / "cpu")["gpu_memory_used_bytes"] in (None, 0)
    gpu, cpu = load_params(tmp_path / "gpu" / "model.params"), load_params(tmp_path / "cpu" / "model.params")
    close(gpu, cpu, GPU_VS_CPU, trained_names(cpu))
    np.testing.assert_allclose(losses(tmp_path / "gpu"), losses(tmp_path / "cpu"), rtol=GPU_VS_CPU)


@needs_gpu
def test_fp16_amp_with_loss_scaling_learns_what_float32_learns(tmp_path, pre):
    train(job(tmp_path, pre, "fp32"))
    train(job(tmp_path, pre, "amp", train={"precision": "amp"}))
    summary = read_summary(tmp_path / "amp")
    assert summary["precision"] == "float16"
    assert np.all(np.isfinite(losses(tmp_path / "amp")))
    amp, fp32 = load_params(tmp_path / "amp" / "model.params"), load_params(tmp_path / "fp32" / "model.params")
    before = load_params(pre)
    assert all(amp[n].dtype == np.float32 for n in amp), "weights are kept in float32"
    if summary["loss_scale_overflows"] == 0:
        assert summary["loss_scale"] == 2.0 ** 16
        close(amp, fp32, AMP_VS_FLOAT32, trained_names(fp32))
    else:  # each overflow skipped its step and halved the scale
        assert summary["loss_scale"] == 2.0 ** 16 / 2 ** summary["loss_scale_overflows"]
        assert all(np.all(np.isfinite(amp[n])) for n in amp)
    frozen = [n for n in before if n not in trained_names(before)]
    assert [n for n in frozen if not np.array_equal(before[n], amp[n])] == []


@needs_gpu
@needs_two
def test_two_ranks_over_nccl_learn_what_one_rank_with_twice_the_batch_learns(tmp_path, pre):
    import horovod.mxnet as hvd

    assert hvd.nccl_built(), "Horovod was built without NCCL"
    train(job(tmp_path, pre, "one", batch=2 * B))
    horovodrun = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", "2", "--gloo"]
    train(job(tmp_path, pre, "two", dist={"batchnorm": "sync"}), launcher=horovodrun)
    summary = read_summary(tmp_path / "two")
    assert summary["world_size"] == 2
    digests = summary["rank_state_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    one, two = load_params(tmp_path / "one" / "model.params"), load_params(tmp_path / "two" / "model.params")
    close(two, one, NCCL_VS_ONE_RANK, trained_names(one))
