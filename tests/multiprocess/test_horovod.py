"""Data-parallel behaviour with real `horovodrun -np 2` processes (Gloo and MPI) and mpirun."""
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import MPI_ENV, ROOT, horovodrun, load_params, make_pretrained, read_summary, run_cli, \
    small_config, write_config

pytestmark = pytest.mark.horovod
BACKENDS = ["gloo", "mpi"]
B = 8  # per-rank batch

CASES = {
    # a trainable conv with no BatchNorm of its own, gradients flowing back through frozen BNs
    "no-bn": ["features.1", "output"],
    # a trainable stage full of BatchNorms, synchronized across ranks
    "sync-bn": ["features.8", "output"],
}


def run_with_pretrained_per_rank(backend, files, cfg, timeout):
    """distft on 2 ranks where rank r loads files[r] as its pretrained file (tests/helpers/per_rank.py)."""
    import subprocess
    import time

    choices = "|".join(f"--set=model.pretrained={f}" for f in files)
    start = time.monotonic()
    proc = subprocess.run(horovodrun(2, backend) + [sys.executable, "tests/helpers/per_rank.py", choices, "--",
                                                    "--config", cfg],
                          cwd=ROOT, env={**os.environ, **MPI_ENV}, capture_output=True, text=True, timeout=timeout)
    proc.elapsed = time.monotonic() - start
    return proc


def job(tmp_path, pretrained, name, trainable, batch, **extra):
    doc = small_config(tmp_path, pretrained, freeze={"trainable": trainable},
                       data={"batch_size": batch, "augment": False},
                       optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
                       train={"max_steps": 4, "output": str(tmp_path / name)}, **extra)
    return write_config(tmp_path / f"{name}.yaml", doc)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, pretrained):
    """One process with batch 2B, for each case (shared by both backends)."""
    out = {}
    for case, trainable in CASES.items():
        tmp = tmp_path_factory.mktemp(f"single-{case}")
        proc = run_cli(["--config", job(tmp, pretrained, "out", trainable, 2 * B)])
        assert proc.returncode == 0, proc.stderr
        out[case] = tmp / "out"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_learn_what_one_rank_with_twice_the_batch_learns(tmp_path, pretrained, single_runs,
                                                                    backend, case):
    proc = run_cli(["--config", job(tmp_path, pretrained, "out", CASES[case], B,
                                    dist={"batchnorm": "sync"})], launcher=horovodrun(2, backend))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = read_summary(tmp_path / "out")
    assert summary["world_size"] == 2 and summary["backend"] == backend
    # the exchange overlaps the next batch with synchronized BNs too (this hung before the
    # sync BN's backward stopped reading gamma: see distft/syncbn.py)
    assert summary["exchange_overlapped"] is True
    assert summary["synchronized_bn_layers"] == (4 if case == "sync-bn" else 0)
    # the statistics channel: MPI wherever MPI is up, Horovod's queue under --gloo
    assert summary["bn_channel"] == ({"mpi": "mpi", "gloo": "horovod"}[backend] if case == "sync-bn" else "none")
    # Horovod's cycle: 1 ms where the statistics may go through its queue (Gloo, dist.batchnorm:
    # sync), 5 ms where it carries gradient buckets alone
    assert summary["horovod_cycle_ms"] == {"mpi": 5.0, "gloo": 1.0}[backend]
    assert summary["horovod_fusion_bytes"] == 8 * 1024 * 1024  # not Horovod's 128 MiB: a second copy of the gradients
    assert summary["mpi_yield_when_idle"] == {"mpi": "1", "gloo": None}[backend]  # no MPI under Gloo
    assert summary["mxnet_cpu_temp_copy"] == "1"  # one CPU workspace per worker thread, not MXNet's 4
    if case == "sync-bn":  # dist.bucket_bytes: auto: the gradients go after backward, in one bucket
        assert summary["gradient_buckets"] == 1
    one, two = load_params(single_runs[case] / "model.params"), load_params(tmp_path / "out" / "model.params")
    before = load_params(pretrained)
    trained = [n for n in two if n.startswith(tuple(p + "." for p in CASES[case]))]
    assert any(not np.array_equal(before[n], two[n]) for n in trained if not n.startswith("output."))
    for n in one:  # relative tolerance 1e-4, measured against each tensor's scale
        np.testing.assert_allclose(two[n], one[n], rtol=1e-4, atol=1e-4 * float(np.abs(one[n]).max()), err_msg=n)
    # one model on every rank; frozen tensors are bitwise the pretrained ones
    digests = summary["rank_state_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    frozen = [n for n in two if n not in trained]
    assert [n for n in frozen if not np.array_equal(before[n], two[n])] == []


def test_sync_batchnorm_backward_running_a_step_behind_neither_hangs_nor_changes_what_is_learned(
        tmp_path, pretrained, single_runs):
    """The exchange overlaps the next batch, so the main thread queues step t+1's forward while
    step t's sync BN backward still runs on MXNet's custom-operator thread (made late here by a
    test hook, so that it always does). Backward must read nothing that the update or the next
    forward writes: when it did (gamma; constants shared with forward), this run hung."""
    proc = run_cli(["--config", job(tmp_path, pretrained, "out", CASES["sync-bn"], B, dist={"batchnorm": "sync"}),
                    "--set", "train.stall_timeout=60"],  # a hang ends the job, ranks and all
                   launcher=horovodrun(2, "gloo"), env={"DISTFT_FAULT_SYNCBN_BACKWARD_DELAY": "0.05"}, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = read_summary(tmp_path / "out")
    assert summary["exchange_overlapped"] is True and summary["synchronized_bn_layers"] == 4
    one, two = load_params(single_runs["sync-bn"] / "model.params"), load_params(tmp_path / "out" / "model.params")
    for n in one:
        np.testing.assert_allclose(two[n], one[n], rtol=1e-4, atol=1e-4 * float(np.abs(one[n]).max()), err_msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_batchnorm_matches_one_bn_over_the_union_batch(tmp_path, backend):
    import mxnet as mx
    from mxnet import autograd
    from mxnet.gluon import nn

    out = tmp_path / "g.npy"
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    import subprocess
    proc = subprocess.run([exe, "-np", "2", f"--{backend}", sys.executable, "tests/helpers/syncbn_check.py",
                           str(out)], cwd=ROOT, env={**os.environ, **MPI_ENV}, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gathered = np.load(out)
    rng = np.random.default_rng(0)
    x_full = rng.normal(1.5, 2.0, (8, 4, 5, 5)).astype(np.float32)
    w_full = rng.normal(0, 1, (8, 4, 5, 5)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    beta = rng.normal(0, 0.5, 4).astype(np.float32)
    bn = nn.BatchNorm(in_channels=4, momentum=0.8)
    bn.initialize()
    bn.gamma.set_data(mx.nd.array(gamma))
    bn.beta.set_data(mx.nd.array(beta))
    x = mx.nd.array(x_full)
    x.attach_grad()
    with autograd.record():
        y = bn(x)
        loss = (y * mx.nd.array(w_full)).sum()
    loss.backward()
    n = 4 * 4 * 5 * 5
    ys = np.concatenate([g[:n].reshape(4, 4, 5, 5) for g in gathered])
    dxs = np.concatenate([g[n:2 * n].reshape(4, 4, 5, 5) for g in gathered])
    dgamma = sum(g[2 * n:2 * n + 4] for g in gathered)  # the trainer's allreduce sums/averages these
    dbeta = sum(g[2 * n + 4:2 * n + 8] for g in gathered)
    np.testing.assert_allclose(ys, y.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dxs, x.grad.asnumpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma, bn.gamma.grad().asnumpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, bn.beta.grad().asnumpy(), rtol=1e-4, atol=1e-4)
    for g in gathered:  # both ranks hold the running statistics of the union batch
        np.testing.assert_allclose(g[2 * n + 8:2 * n + 12], bn.running_mean.data().asnumpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g[2 * n + 12:], bn.running_var.data().asnumpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_trainable_bytes_are_broadcast(tmp_path, pretrained, backend):
    proc = run_cli(["--config", job(tmp_path, pretrained, "out", ["output"], B, dist={"trainable_start": "broadcast"})],
                   launcher=horovodrun(2, backend))
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path / "out")
    assert s["bytes_broadcast_trainable"] == s["trainable_bytes"] == (512 * 5 + 5) * 4
    assert s["bytes_broadcast"] - s["bytes_broadcast_trainable"] == s["bytes_control"] < 20_000
    assert s["bytes_full_broadcast"] == (s["trainable_bytes"] + s["frozen_bytes"])
    assert s["bytes_broadcast"] * 100 < s["bytes_full_broadcast"]
    assert s["allreduce_bytes_per_step"] == s["trainable_bytes"]


def test_fp16_compression_in_several_buckets_learns_the_same_to_float16_precision(tmp_path, pretrained, single_runs):
    """Gradients travel as float16, in small buckets (the stop vote rides in the last one)."""
    proc = run_cli(["--config", job(tmp_path, pretrained, "out", CASES["sync-bn"], B,
                                    dist={"batchnorm": "sync", "compression": "fp16", "bucket_bytes": 64 * 1024,
                                          "gradient_predivide_factor": 2.0})],
                   launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = read_summary(tmp_path / "out")
    assert s["allreduce_bytes_per_step"] * 2 == s["trainable_bytes"]  # half the bytes on the wire
    assert s["gradient_buckets"] > 1  # a number set stands beside synchronized BNs (auto: one bucket)
    one, two = load_params(single_runs["sync-bn"] / "model.params"), load_params(tmp_path / "out" / "model.params")
    before = load_params(pretrained)
    for n in one:
        if n.startswith(("features.8.", "output.")) and not n.endswith(("running_mean", "running_var")):
            d1, d2 = (one[n] - before[n]).ravel(), (two[n] - before[n]).ravel()
            assert np.linalg.norm(d2 - d1) <= 0.01 * np.linalg.norm(d1), n  # float16 keeps ~3 digits


def perturbed_copy(src, dst, prefix):
    """The pretrained file with every tensor under `prefix` changed a little."""
    import mxnet as mx

    params = mx.nd.load(str(src))
    changed = {k: v + 1e-3 for k, v in params.items() if k.startswith(prefix) and not k.endswith("running_var")}
    mx.nd.save(str(dst), {**params, **changed})
    return str(dst), sum(v.size * 4 for v in changed.values())


def test_trainable_tensors_are_verified_and_only_differing_ones_sent(tmp_path, pretrained):
    """`dist.trainable_start: verify` (the default): ranks that loaded the same weights send no
    tensor at all; a rank whose trainable stage differs gets exactly those tensors from rank 0,
    and trains to the same model."""
    trainable = ["features.8", "output"]
    same = job(tmp_path, pretrained, "same", trainable, B)
    proc = run_cli(["--config", same], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path / "same")
    assert s["bytes_broadcast_trainable"] == 0
    assert 0 < s["bytes_control"] < 20_000 and s["bytes_full_broadcast"] > 1000 * s["bytes_broadcast"]

    other, changed_bytes = perturbed_copy(pretrained, tmp_path / "other.params", "features.8.")
    cfg = job(tmp_path, pretrained, "mixed", trainable, B)
    proc = run_with_pretrained_per_rank("gloo", [pretrained, other], cfg, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = read_summary(tmp_path / "mixed")
    assert s["bytes_broadcast_trainable"] == changed_bytes > 0
    assert s["rank_state_digests"][0] == s["rank_state_digests"][1]
    a, b = load_params(tmp_path / "same" / "model.params"), load_params(tmp_path / "mixed" / "model.params")
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def test_local_batchnorm_statistics_are_averaged_so_ranks_agree(tmp_path, pretrained):
    proc = run_cli(["--config", job(tmp_path, pretrained, "out", ["features.8", "output"], B,
                                    dist={"batchnorm": "local"})], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stderr
    digests = read_summary(tmp_path / "out")["rank_state_digests"]
    assert digests[0] == digests[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_with_a_different_pretrained_file_stops_the_job(tmp_path, pretrained, backend):
    other = make_pretrained(tmp_path / "other.params", seed=7)
    cfg = job(tmp_path, pretrained, "out", ["output"], B)
    proc = run_with_pretrained_per_rank(backend, [pretrained, other], cfg, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "frozen parameter features.0.running_mean differs between ranks: rank(s) [1] disagree with rank 0" in text
    assert proc.elapsed < 60
    assert not os.path.exists(tmp_path / "out" / "model.params")


def test_plain_mpirun_launch_learns_what_one_rank_with_twice_the_batch_learns(tmp_path, pretrained, single_runs):
    """Plain mpirun (no horovodrun): Horovod over MPI, synchronized BNs over the MPI statistics
    channel (duplicates of MPI_COMM_WORLD), and the same model as one rank with 2B."""
    mpirun = shutil.which("mpirun")
    proc = run_cli(["--config", job(tmp_path, pretrained, "out", CASES["sync-bn"], B)],
                   launcher=[mpirun, "-np", "2", "--oversubscribe", "-x", "HOROVOD_CYCLE_TIME", "-x",
                             "HOROVOD_FUSION_THRESHOLD", "-x", "OMPI_MCA_mpi_yield_when_idle", "-x", "MXNET_CPU_TEMP_COPY"],
                   env={"HOROVOD_CYCLE_TIME": "3", "HOROVOD_FUSION_THRESHOLD": "1048576",
                        "OMPI_MCA_mpi_yield_when_idle": "0", "MXNET_CPU_TEMP_COPY": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = read_summary(tmp_path / "out")
    assert s["world_size"] == 2 and s["backend"] == "mpi" and s["bn_channel"] == "mpi"
    assert s["horovod_cycle_ms"] == 3.0  # the user's HOROVOD_CYCLE_TIME, not distft's choice
    assert s["horovod_fusion_bytes"] == 1048576 and s["mpi_yield_when_idle"] == "0"  # and the user's MPI settings
    assert s["mxnet_cpu_temp_copy"] == "2"  # and MXNet's
    assert s["synchronized_bn_layers"] == 4 and s["exchange_overlapped"] is True
    one, two = load_params(single_runs["sync-bn"] / "model.params"), load_params(tmp_path / "out" / "model.params")
    for n in one:
        np.testing.assert_allclose(two[n], one[n], rtol=1e-4, atol=1e-4 * float(np.abs(one[n]).max()), err_msg=n)


def test_demo_runs_on_two_ranks(tmp_path, pretrained):
    cfg = write_config(tmp_path / "demo.yaml", {
        **small_config(tmp_path, pretrained), "data": {"train": "demo", "val": "demo", "batch_size": 16}})
    proc = run_cli(["--config", cfg, "--set", "train.max_steps=10"], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path / "out")
    assert s["world_size"] == 2 and s["val_top1"] is not None and s["steps"] == 10


# --- users' photos: JPEG (baseline, progressive, grayscale, CMYK, EXIF-rotated) and PNG ---------

PHOTO_CLASSES = ["cat", "dog", "emu", "fox"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of photos, and the same photos as a .rec made by `distft make-rec` (JPEG and
    PNG payloads)."""
    from distft.data import makerec

    from imagefiles import make_photo_folder

    tmp = tmp_path_factory.mktemp("photos")
    folder = make_photo_folder(tmp / "photos", PHOTO_CLASSES, per_class=6)
    rec = makerec.make_rec(folder, str(tmp / "photos.rec"), jobs=1)
    assert rec["records"] == 24 and rec["skipped"] == []
    return {"folder": folder, "rec": rec["rec"]}


def photo_job(tmp_path, pretrained, data, name, batch):
    doc = small_config(tmp_path, pretrained, model={"classes": "auto"},
                       data={"train": data, "val": data, "batch_size": batch, "augment": False, "max_bad_files": 0},
                       train={"max_steps": 3, "output": str(tmp_path / name)})
    return write_config(tmp_path / f"{name}.yaml", doc)


@pytest.mark.parametrize("data, launcher", [("folder", "gloo"), ("folder", "mpi"), ("rec", "mpirun")])
def test_jpeg_photos_train_under_every_launcher_as_in_one_process(tmp_path, pretrained, photos, data, launcher):
    """Before the decoder was loaded ahead of Horovod, every JPEG was 'unreadable' on every rank
    (and the verdicts were cached for later launches)."""
    one = run_cli(["--config", photo_job(tmp_path, pretrained, photos[data], "one", 2 * 4)])
    assert one.returncode == 0, one.stderr
    prefix = [shutil.which("mpirun"), "-np", "2", "--oversubscribe"] if launcher == "mpirun" else horovodrun(2, launcher)
    two = run_cli(["--config", photo_job(tmp_path, pretrained, photos[data], "two", 4)], launcher=prefix)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "unreadable" not in two.stdout + two.stderr
    s = read_summary(tmp_path / "two")
    assert s["world_size"] == 2 and s["bad_samples"] == 0 and s["classes"] == PHOTO_CLASSES
    single, double = load_params(tmp_path / "one" / "model.params"), load_params(tmp_path / "two" / "model.params")
    for n in ("output.weight", "output.bias"):
        np.testing.assert_allclose(double[n], single[n], rtol=1e-5, atol=1e-5 * float(np.abs(single[n]).max()))
    assert read_summary(tmp_path / "one")["val_top1"] == s["val_top1"]


@pytest.mark.parametrize("backend, expected", [("gloo", {75: 1, 2: 1}), ("mpi", {75: 75, 2: 2})])
def test_what_plain_horovodrun_makes_of_a_ranks_exit_code(backend, expected):
    """What the README says of plain horovodrun (and why launch.sh runs it under
    distft/launcher.py): Gloo turns every failure into 1; MPI execs mpirun, whose status is the
    first failing rank's."""
    import subprocess

    for code, want in expected.items():
        proc = subprocess.run(horovodrun(2, backend) + [sys.executable, "-c", f"raise SystemExit({code})"],
                              env={**os.environ, **MPI_ENV}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == want, (code, proc.stdout[-2000:] + proc.stderr[-2000:])


def test_a_pretrained_file_missing_on_one_rank_stops_every_rank_before_any_data_is_read(tmp_path, pretrained):
    from imagefiles import make_folder

    train = make_folder(tmp_path / "train", ["ant", "bee"], per_class=4)
    (tmp_path / "train" / "ant" / "bad.png").write_bytes(b"not an image")  # fatal, if it were read
    cfg = write_config(tmp_path / "c.yaml", small_config(
        tmp_path, pretrained, model={"classes": "auto"},
        data={"train": train, "batch_size": 4, "max_bad_files": 0, "max_bad_fraction": 0.0}))
    proc = run_with_pretrained_per_rank("gloo", [pretrained, str(tmp_path / "gone.params")], cfg, timeout=120)
    text = proc.stdout + proc.stderr
    line = f"error (rank {{}}): rank 1: model.pretrained: {tmp_path / 'gone.params'}: no such file"
    assert proc.returncode != 0 and line.format(0) in text and line.format(1) in text, text[-3000:]
    assert "unreadable" not in text and proc.elapsed < 60
