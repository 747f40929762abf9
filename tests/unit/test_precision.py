"""Mixed precision (train.precision: amp): bfloat16 on this CPU. AMP rewrites MXNet's operators
process-wide, so each run is its own process."""
import numpy as np
import pytest

from distft.precision import LossScale, cpu_flags

from conftest import horovodrun, load_params, read_summary, run_cli, small_config, write_config

needs_bf16 = pytest.mark.skipif("avx512bw" not in cpu_flags(), reason="bfloat16 needs an AVX-512 CPU")


def job(tmp_path, pretrained, name, **train):
    doc = small_config(tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]},
                       data={"batch_size": 16, "val": "demo"}, optimizer={"lr": 0.01},
                       dist={"batchnorm": "local"},
                       train={"max_steps": 6, "output": str(tmp_path / name), **train})
    return write_config(tmp_path / f"{name}.yaml", doc)


@needs_bf16
def test_bfloat16_amp_trains_what_float32_trains_and_moves_no_frozen_weight(tmp_path, pretrained):
    for name, precision in (("fp32", "float32"), ("amp", "amp")):
        proc = run_cli(["--config", job(tmp_path, pretrained, name, precision=precision)])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s32, s16 = read_summary(tmp_path / "fp32"), read_summary(tmp_path / "amp")
    assert s32["precision"] == "float32" and s16["precision"] == "bfloat16" and s16["loss_scale"] == 1.0
    before = load_params(pretrained)
    a, b = load_params(tmp_path / "fp32" / "model.params"), load_params(tmp_path / "amp" / "model.params")
    for n in a:
        if n.startswith(("features.8.", "output.")) and not n.endswith(("running_mean", "running_var")):
            # the same update, to bfloat16's precision (8 significant bits) compounded over the
            # layers and 6 steps: measured cosine >= 0.993, norm within 12%
            da, db = (a[n] - before[n]).ravel(), (b[n] - before[n]).ravel()
            assert np.linalg.norm(da) > 0, n
            assert da @ db >= 0.98 * np.linalg.norm(da) * np.linalg.norm(db), n
            assert np.linalg.norm(db - da) <= 0.25 * np.linalg.norm(da), n
        elif not n.startswith(("features.8.", "output.")):
            assert np.array_equal(b[n], before[n]), n  # weights stay float32; frozen ones bitwise
        assert b[n].dtype == np.float32
    assert abs(s16["val_loss"] - s32["val_loss"]) <= 0.02 * s32["val_loss"]


@needs_bf16
@pytest.mark.horovod
def test_amp_with_synchronized_batchnorm_on_two_ranks_matches_one_rank_with_twice_the_batch(tmp_path, pretrained):
    """Sync BN statistics are summed in float32 under AMP; 2 ranks x 8 and 1 rank x 16 then take
    the same steps, to bfloat16's precision."""
    one = job(tmp_path, pretrained, "one", precision="amp")
    proc = run_cli(["--config", one, "--set", "data.batch_size=16", "--set", "dist.batchnorm=sync"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    two = job(tmp_path, pretrained, "two", precision="amp")
    proc = run_cli(["--config", two, "--set", "data.batch_size=8", "--set", "dist.batchnorm=sync"],
                   launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = read_summary(tmp_path / "two")
    assert s["precision"] == "bfloat16" and s["rank_state_digests"][0] == s["rank_state_digests"][1]
    before = load_params(pretrained)
    a, b = load_params(tmp_path / "one" / "model.params"), load_params(tmp_path / "two" / "model.params")
    for n in a:
        if n.startswith("features.8.") and n.endswith(("weight", "gamma", "beta")):
            da, db = (a[n] - before[n]).ravel(), (b[n] - before[n]).ravel()
            assert da @ db >= 0.98 * np.linalg.norm(da) * np.linalg.norm(db), n


def test_float16_loss_scale_halves_on_overflow_and_grows_after_a_clean_window():
    s = LossScale("float16", initial=1024.0, window=3)
    s.overflowed()
    assert s.scale == 512.0 and s.overflows == 1
    for _ in range(3):
        s.stepped()
    assert s.scale == 1024.0
    s.stepped(), s.stepped(), s.overflowed(), s.stepped(), s.stepped()
    assert s.scale == 512.0  # the overflow restarted the window
    for _ in range(40):
        s.overflowed()
    assert s.scale == 1.0  # never below 1
    bf16 = LossScale("bfloat16")
    bf16.stepped()
    assert bf16.scale == 1.0 and not bf16.dynamic
