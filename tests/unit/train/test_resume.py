"""One model on every rank, across every resume: exact resume on 2 ranks for every optimizer,
resume on another world size, agreed decisions and errors. Real horovodrun processes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distft.components import checkpoint
from distft.errors import ConfigError, DistributedError
from distft.components.state import TrainState, split_global_batch

from conftest import MPI_ENV, ROOT, horovodrun, load_params, read_summary, run_cli, small_config, write_config


def max_diff(a_dir, b_dir):
    a, b = load_params(a_dir / "model.params"), load_params(b_dir / "model.params")
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in a)


def launch(cfg, np_, *extra, env=None, backend="gloo"):
    return run_cli(["--config", cfg, *extra], launcher=horovodrun(np_, backend) if np_ > 1 else None,
                   env=env, timeout=600)


# --- the train state and the global batch, as plain logic -----------------------------------------

def test_global_batch_is_split_into_the_fewest_micro_batches_that_fit():
    b = split_global_batch(32, 1, 8, last_world_size=4)
    assert (b.per_rank, b.accumulate, b.micro) == (32, 4, 8)
    b = split_global_batch(24, 2, 5, last_world_size=4)
    assert (b.per_rank, b.accumulate, b.micro) == (12, 3, 4)  # 12 = 3 x 4, never over 5
    assert split_global_batch(16, 4, 4, last_world_size=4).accumulate == 1


@pytest.mark.parametrize("world", [3, 64])
def test_a_world_size_that_cannot_take_the_global_batch_is_refused_naming_both(world):
    with pytest.raises(ConfigError) as err:
        split_global_batch(32, world, 8, last_world_size=4)
    msg = str(err.value)
    assert msg.startswith("data.global_batch: the job's global batch of 32 samples (last launched on 4 ")
    assert f"cannot be split evenly over {world} ranks" in msg and "divides it (e.g. " in msg


def test_train_state_round_trips_and_reads_the_first_checkpoint_format():
    s = TrainState(epoch=2, samples_in_epoch=96, step=50, plan_epoch=1, world_size=4, global_batch=32)
    restored = TrainState()
    restored.load_state_dict(s.state_dict(), batch_size=99)
    assert restored == s and TrainState.from_meta(s.state_dict(), batch_size=99) == s
    old = {"format": 1, "epoch": 1, "step_in_epoch": 5, "step": 27, "world_size": 2, "plan_epoch": 1}
    t = TrainState.from_meta(old, batch_size=16)
    assert (t.global_batch, t.samples_in_epoch, t.step_in_epoch, t.step) == (32, 160, 5, 27)


def test_a_rank_is_given_the_gpu_it_can_see():
    from distft.distributed.world import gpu_index

    assert gpu_index(0, 0, 1, 0, None) is None  # no GPU: the CPU
    assert gpu_index(5, 3, 4, 1, "3") == 0  # one visible GPU per process (Slurm, device plugins)
    assert gpu_index(5, 3, 4, 4, None) == 3  # all of the node's GPUs: the local rank's
    with pytest.raises(DistributedError) as err:
        gpu_index(5, 3, 4, 2, "0,1")
    assert str(err.value) == ("rank 5 (local rank 3 of 4 on this node) has no GPU of its own: this process sees "
                              "2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1); give each rank exactly one GPU, or every "
                              "rank all 4 of the node's")


# --- exact resume on the same world size ------------------------------------------------------------

@pytest.mark.horovod
@pytest.mark.parametrize("optimizer", ["sgd", "nag", "adam"])
def test_two_ranks_resume_mid_epoch_to_the_weights_of_the_uninterrupted_run(tmp_path, pretrained, optimizer):
    """Adam's per-parameter update counts (its bias correction) must reach every rank."""
    doc = small_config(tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]},
                       data={"batch_size": 16, "augment": True},
                       optimizer={"name": optimizer, "lr": 0.01 if optimizer != "adam" else 0.001,
                                  "schedule": "cosine", "warmup_steps": 3},
                       train={"epochs": 2, "max_steps": 30, "checkpoint_every_steps": 8, "keep_checkpoints": 5})
    cfg = write_config(tmp_path / "c.yaml", doc)
    proc = launch(cfg, 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    full = read_summary(tmp_path / "out")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "out" / "checkpoints" / "ckpt-00000024", resumed / "checkpoints" / "ckpt-00000024")
    proc = launch(cfg, 2, "--set", f"train.output={resumed}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = read_summary(resumed)
    assert s["resumed"] and s["steps_this_run"] == 6
    assert (s["steps"], s["epochs"]) == (full["steps"], full["epochs"]) == (30, round(30 / 22, 3))
    assert max_diff(tmp_path / "out", resumed) <= 1e-6


# --- another world size on every relaunch -----------------------------------------------------------

PLANS = {  # trainable blocks, learning rate
    "head-only": (["output"], 0.05),
    # trainable convolutions, no trainable BatchNorm: the last stage's conv weights
    "last-stage-convs": ([r"/^features\.8\..*conv\d\.weight$/", "output"], 0.0005),
}


def stopped_at(proc):
    text = proc.stdout + proc.stderr
    assert "preempted (SIGTERM) at step " in text, text[-3000:]
    return int(text.split("preempted (SIGTERM) at step ")[1].split(";")[0])


@pytest.mark.horovod
@pytest.mark.parametrize("plan", list(PLANS))
def test_stopped_on_4_ranks_resumed_on_2_then_1_ends_where_4_ranks_end(tmp_path, pretrained, plan):
    trainable, lr = PLANS[plan]
    doc = small_config(tmp_path, pretrained, freeze={"trainable": trainable}, data={"batch_size": 4},
                       optimizer={"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4,
                                  "schedule": "cosine"},
                       train={"epochs": 1, "max_steps": 16, "log_every": 2})
    full = tmp_path / "full"
    proc = launch(write_config(tmp_path / "full.yaml", {**doc, "train": {**doc["train"], "output": str(full)}}), 4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = write_config(tmp_path / "c.yaml", doc)
    out = tmp_path / "out"
    first = launch(cfg, 4, env={"DISTFT_FAULT_STOP_AT_STEP": "5@2"})  # a stop request on rank 2
    assert first.returncode != 0
    a = stopped_at(first)
    second = launch(cfg, 2, env={"DISTFT_FAULT_STOP_AT_STEP": f"{a + 4}@1"})
    assert second.returncode != 0
    b = stopped_at(second)
    assert 5 < a < b < 16
    last = launch(cfg, 1)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    s, f = read_summary(out), read_summary(full)
    assert (s["steps"], s["epochs"], s["global_batch"]) == (f["steps"], f["epochs"], f["global_batch"]) == \
        (16, round(16 / 44, 3), 16)
    assert s["accumulation"] == 4 and s["world_size"] == 1
    assert [(g["world_size"], g["start_step"], g["end_step"], g["samples"]) for g in s["segments"]] == \
        [(4, 0, a, a * 16), (2, a, b, (b - a) * 16), (1, b, 16, (16 - b) * 16)]
    assert [h["step"] for h in s["history"]] == list(range(2, 17, 2))  # every launch's windows, once
    assert max_diff(full, out) <= 1e-5


# --- agreed decisions --------------------------------------------------------------------------------

@pytest.mark.horovod
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, pretrained):
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, train={"max_steps": 6}))
    proc = launch(cfg, 2, env={"DISTFT_FAULT_NONFINITE_LOSS": "1@3"})
    assert proc.returncode != 0
    want = "step 3 (epoch 0): non-finite loss on rank(s) [1] (lower optimizer.lr, or set train.on_nonfinite: skip)"
    for rank in (0, 1):
        assert f"[{rank}]<stderr>:distft: error (rank {rank}): {want}" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert not (tmp_path / "out" / "model.params").exists()


@pytest.mark.horovod
def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path, pretrained):
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, train={
        "max_steps": 6, "on_nonfinite": "skip"}))
    proc = launch(cfg, 2, env={"DISTFT_FAULT_NONFINITE_LOSS": "1@3"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = read_summary(tmp_path / "out")
    assert s["skipped_steps"] == 1 and s["steps"] == 6
    # the update of step 3 was dropped (on every rank, or the end-of-run digests would differ)
    assert launch(cfg, 2, "--set", f"train.output={tmp_path / 'clean'}").returncode == 0
    assert max_diff(tmp_path / "out", tmp_path / "clean") > 0


@pytest.mark.horovod
def test_gradual_unfreezing_with_local_batchnorm_and_no_validation_finishes(tmp_path, pretrained):
    doc = small_config(tmp_path, pretrained, data={"batch_size": 32, "val": None},
                       freeze={"trainable": ["output"], "schedule": [{"epoch": 1, "unfreeze": ["features.7"]},
                                                                     {"epoch": 2, "unfreeze": ["features.6"]}]},
                       dist={"batchnorm": "local"},
                       train={"epochs": 3, "max_steps": None, "checkpoint_every_epochs": 0, "log_every": 5})
    proc = launch(write_config(tmp_path / "c.yaml", doc), 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = read_summary(tmp_path / "out")
    assert [w["epoch"] for w in s["freeze_switches"]] == [1, 2]
    assert all(len(set(w["rank_state_digests"])) == 1 for w in s["freeze_switches"])


def same_error_on_every_rank(text, n=2):
    lines = {}
    for rank in range(n):
        prefix = f"[{rank}]<stderr>:distft: error (rank {rank}): "
        found = [ln[len(prefix):] for ln in text.splitlines() if ln.startswith(prefix)]
        assert found, (rank, text[-3000:])
        lines[rank] = found[-1]
    assert len(set(lines.values())) == 1, lines
    return lines[0]


@pytest.mark.horovod
def test_checkpoints_rank_0_cannot_use_stop_every_rank_with_the_same_message(tmp_path, pretrained):
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, train={
        "max_steps": 4, "checkpoint_every_steps": 2, "stall_timeout": 120}))
    assert launch(cfg, 2).returncode == 0
    # a checkpoint of the first format (no job identity) from another freeze plan
    newest = checkpoint.list_checkpoints(str(tmp_path / "out"))[-1]
    meta = json.loads(open(os.path.join(newest, "meta.json")).read())
    for key in ("job", "state"):
        meta.pop(key)
    meta.update(format=1, epoch=0, step_in_epoch=4)
    open(os.path.join(newest, "meta.json"), "w").write(json.dumps(meta))
    other = write_config(tmp_path / "o.yaml", small_config(tmp_path, pretrained, freeze={
        "trainable": ["features.8", "output"]}, train={"max_steps": 6, "stall_timeout": 120}))
    start = time.monotonic()
    proc = launch(other, 2)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    msg = same_error_on_every_rank(proc.stdout + proc.stderr)
    assert msg.startswith(f"{newest}: does not belong to this model/freeze plan; missing: features.8")
    assert "Process 0 exit with status code 2" in proc.stdout + proc.stderr or \
        "Exit code: 2" in proc.stdout + proc.stderr
    # every checkpoint corrupt: the same, from the read
    for path in checkpoint.list_checkpoints(str(tmp_path / "out")):
        with open(os.path.join(path, "trainable.params"), "r+b") as fh:
            fh.seek(64)
            fh.write(b"\0\1\2\3")
    start = time.monotonic()
    proc = launch(cfg, 2)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    msg = same_error_on_every_rank(proc.stdout + proc.stderr)
    assert msg.startswith("train.output: none of the 2 checkpoint(s) in ") and "checksum mismatch" in msg


@pytest.mark.horovod
def test_an_error_only_one_rank_sees_at_start_stops_every_rank_with_the_same_line(tmp_path, pretrained):
    """Rank 1's metrics port (metrics.port + local rank) is taken on its machine."""
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1] - 1
    try:
        cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, metrics={
            "port": port, "bind": "127.0.0.1"}, train={"stall_timeout": 120}))
        start = time.monotonic()
        proc = launch(cfg, 2)
    finally:
        blocker.close()
    assert proc.returncode != 0 and time.monotonic() - start < 60
    msg = same_error_on_every_rank(proc.stdout + proc.stderr)
    assert msg.startswith(f"rank 1: metrics.port: cannot serve metrics on 127.0.0.1:{port + 1} (port + local_rank 1)")
    assert not (tmp_path / "out" / "config.yaml").exists()  # refused before the run folder changed
    log = tmp_path / "out" / "log.jsonl"
    assert not log.exists() or log.read_text() == ""


# --- preemption ----------------------------------------------------------------------------------------

def test_a_checkpoint_slower_than_the_grace_period_is_still_written_after_sigterm(tmp_path, pretrained):
    """train.preempt_grace is for a peer that is gone: it must not kill a rank writing the
    agreed checkpoint."""
    doc = small_config(tmp_path, pretrained, data={"batch_size": 8},
                       train={"epochs": 50, "max_steps": None, "preempt_grace": 1, "log_every": 1,
                              "checkpoint_every_epochs": 0})
    cfg = write_config(tmp_path / "c.yaml", doc)
    proc = subprocess.Popen([sys.executable, "-m", "distft", "--config", cfg], cwd=ROOT,
                            env={**os.environ, **MPI_ENV, "DISTFT_FAULT_CHECKPOINT_DELAY": "4"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "epoch 0 step 3/" in line:
                break
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, text
    step = int(text.split("preempted (SIGTERM) at step ")[1].split(";")[0])
    assert checkpoint.latest(str(tmp_path / "out")).meta["step"] == step


def test_a_data_set_that_changed_since_the_checkpoint_is_refused_unless_accepted(tmp_path, pretrained):
    """12 images added between launches were resumed silently, and val_split's hold-out then
    leaked into training. A relaunch compares data.train's files (names and sizes) with the
    checkpoint's record; data.on_change: accept resumes knowingly (the hold-out, chosen by each
    file's name, still holds out the same files)."""
    from distft.config import load_config
    from distft.data.sets import open_training_sets
    from distft.distributed.world import LocalWorld
    from distft.errors import DataError
    from distft.train.run import run

    from imagefiles import make_photo_folder

    root = make_photo_folder(tmp_path / "photos", ["ant", "bee"], per_class=10)
    cfg = write_config(tmp_path / "c.yaml", small_config(
        tmp_path, pretrained, model={"classes": "auto"}, data={"train": root, "val_split": 0.25, "batch_size": 4},
        train={"max_steps": None, "epochs": 1}))
    first = run(load_config(cfg), LocalWorld())
    before = open_training_sets(load_config(cfg).data, "auto")
    make_photo_folder(tmp_path / "more", ["ant", "bee"], per_class=6, seed=9)
    for p in (tmp_path / "more").rglob("*.*"):
        shutil.copy(p, os.path.join(root, p.parent.name, "new-" + p.name))
    with pytest.raises(DataError) as err:
        run(load_config(cfg, ["train.epochs=2"]), LocalWorld())
    assert str(err.value) == (
        f"data.train: {root} has changed since this job's checkpoints were written (20 files then, 32 now; "
        "names or sizes differ): a resume would train on another data set; set data.on_change: accept to resume "
        "on it knowingly, or start a new job (another train.output, or train.resume: false)")
    second = run(load_config(cfg, ["train.epochs=2", "data.on_change=accept"]), LocalWorld())
    assert second["steps"] > first["steps"] and second["resumed"]
    after = open_training_sets(load_config(cfg).data, "auto")
    ids = lambda part: {part.base.ids[i] for i in part.indices}  # noqa: E731
    assert ids(before[1]) <= ids(after[1]) and not ids(before[0]) & ids(after[1])  # nothing trained on is validated
    assert second["data"]["data.train"]["files"] == 32
