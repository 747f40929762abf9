"""Faults, for real: signals to real ranks, a full file system, corrupt images, NaN, fuzzed
configs. Nothing completed is lost and nothing hangs."""
import os
import re
import signal
import string
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distft.components import checkpoint
from distft.config import Config, load_config
from distft.errors import ConfigError

from conftest import MPI_ENV, ROOT, horovodrun, load_params, read_summary, run_cli, small_config, write_config
from imagefiles import png
from processes import kill_tree, wait_for


def start_job(tmp_path, pretrained, launcher, **sections):
    cfg = write_config(tmp_path / "c.yaml", small_config(tmp_path, pretrained, **sections))
    proc = subprocess.Popen(launcher + [sys.executable, "-m", "distft", "--config", cfg], cwd=ROOT,
                            env={**os.environ, **MPI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return cfg, proc


def rank_pids(launcher_pid, n=2, timeout=60):
    """The PIDs of the `python -m distft` rank processes under a launcher."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for p in psutil.Process(launcher_pid).children(recursive=True):
            try:
                cmd = p.cmdline()
                if "distft" not in cmd or "-m" not in cmd:
                    continue
                env = p.environ()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            rank = env.get("HOROVOD_RANK") or env.get("OMPI_COMM_WORLD_RANK")
            if rank is not None:
                ranks[int(rank)] = p.pid
        if len(ranks) == n:
            return ranks
        time.sleep(0.2)
    raise TimeoutError("rank processes not found")


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True






LONG_JOB = dict(data={"batch_size": 8}, train={"epochs": 50, "max_steps": None, "checkpoint_every_steps": 5,
                                               "keep_checkpoints": 3, "log_every": 5})


@pytest.mark.horovod
def test_sigterm_to_one_rank_stops_all_at_one_step_with_a_checkpoint_and_resume_finishes(tmp_path, pretrained):
    cfg, proc = start_job(tmp_path, pretrained, horovodrun(2, "gloo"), **LONG_JOB)
    out = tmp_path / "out"
    try:
        ranks = rank_pids(proc.pid)
        wait_for(lambda: checkpoint.list_checkpoints(str(out)), 120, "a first checkpoint")
        os.kill(ranks[1], signal.SIGTERM)  # like an eviction reaching one pod first
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode != 0
    assert "preempted (SIGTERM) at step" in text
    step = int(text.split("preempted (SIGTERM) at step ")[1].split(";")[0])
    latest = checkpoint.latest(str(out))
    assert latest.meta["step"] == step  # written at the agreed step, after the SIGTERM
    assert not (out / "summary.json").exists()
    # the relaunch resumes there and finishes a short remainder
    proc2 = run_cli(["--config", cfg, "--set", f"train.max_steps={step + 3}"], launcher=horovodrun(2, "gloo"))
    assert proc2.returncode == 0, proc2.stdout[-2000:] + proc2.stderr[-2000:]
    s = read_summary(out)
    assert s["resumed"] and s["steps"] == step + 3 and s["steps_this_run"] == 3


def signal_after_a_checkpoint(tmp_path, pretrained, signum):
    """One process of a long job, sent `signum` once its first checkpoint is written: (exit
    status, output)."""
    cfg, proc = start_job(tmp_path, pretrained, [], **LONG_JOB)
    try:
        wait_for(lambda: checkpoint.list_checkpoints(str(tmp_path / "out")), 120, "a first checkpoint")
        proc.send_signal(signum)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return proc.returncode, text


def test_sigterm_single_process_exits_75(tmp_path, pretrained):
    returncode, text = signal_after_a_checkpoint(tmp_path, pretrained, signal.SIGTERM)
    assert returncode == 75, text
    # a clean stop is not an error: one plain line, the stop step, the checkpoint, how to resume
    assert re.fullmatch(r"distft: preempted \(SIGTERM\) at step \d+; checkpoint written; run the same command "
                        r"again to resume", text.strip().splitlines()[-1]), text
    assert "distft: error" not in text


def test_ctrl_c_to_one_process_is_a_preemption(tmp_path, pretrained):
    """Ctrl-C (SIGINT) gave exit 130, no message and no checkpoint; it now does what SIGTERM does:
    every rank agrees on a step, checkpoints there and exits 75 with the way to resume."""
    out = tmp_path / "out"
    returncode, text = signal_after_a_checkpoint(tmp_path, pretrained, signal.SIGINT)
    assert returncode == 75, text
    assert "[distft] Ctrl-C: stopping at the next step with a checkpoint" in text
    last = text.strip().splitlines()[-1]
    assert "preempted (Ctrl-C) at step " in last and last.endswith("run the same command again to resume")
    step = int(last.split("preempted (Ctrl-C) at step ")[1].split(";")[0])
    assert checkpoint.latest(str(out)).meta["step"] == step


@pytest.mark.horovod
def test_ctrl_c_to_horovodrun_checkpoints_every_rank_at_one_step(tmp_path, pretrained):
    """A terminal's Ctrl-C reaches horovodrun (its ranks run in a session of their own), which
    passes SIGTERM to them: they checkpoint at one agreed step and each exits 75; the relaunch
    resumes there. (horovodrun's Gloo launcher then exits 1 for any rank's non-zero code:
    launch/launch.sh reports the ranks' 75.)"""
    cfg, proc = start_job(tmp_path, pretrained, horovodrun(2, "gloo"), **LONG_JOB)
    out = tmp_path / "out"
    try:
        rank_pids(proc.pid)
        wait_for(lambda: checkpoint.list_checkpoints(str(out)), 120, "a first checkpoint")
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's foreground process group
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    # horovodrun (Gloo) names the first rank to end, and terminates the others as soon as it sees
    # it (under load, before a slower rank's own exit): the first rank's code is 75, and the
    # checkpoint below is at the step every rank agreed on
    assert "Exit code: 75" in text, text[-2000:]
    assert "Process 0 exit with status code 75." in text or "Process 1 exit with status code 75." in text
    step = int(text.split("preempted (SIGTERM) at step ")[1].split(";")[0])
    assert checkpoint.latest(str(out)).meta["step"] == step
    again = run_cli(["--config", cfg, "--set", f"train.max_steps={step + 2}"], launcher=horovodrun(2, "gloo"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_summary(out)["steps_this_run"] == 2


@pytest.mark.horovod
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_killed_rank_stops_the_job_quickly_and_the_last_checkpoint_survives(tmp_path, pretrained, backend):
    cfg, proc = start_job(tmp_path, pretrained, horovodrun(2, backend), **LONG_JOB)
    out = tmp_path / "out"
    try:
        ranks = rank_pids(proc.pid)
        wait_for(lambda: len(checkpoint.list_checkpoints(str(out))) >= 1, 120, "a first checkpoint")
        os.kill(ranks[1], signal.SIGKILL)
        start = time.monotonic()
        text, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode != 0
    # every surviving rank is gone within 60 s of the kill (the launcher may return first)
    wait_for(lambda: gone(ranks[0]), max(1.0, 60 - elapsed), "rank 0 to exit")
    latest = checkpoint.latest(str(out))  # verifies checksums
    assert latest is not None
    proc2 = run_cli(["--config", cfg, "--set", f"train.max_steps={latest.meta['step'] + 2}"],
                    launcher=horovodrun(2, backend))
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    assert read_summary(out)["resumed"]


@pytest.mark.horovod
def test_stopped_rank_makes_the_others_abort_within_the_stall_timeout(tmp_path, pretrained):
    cfg, proc = start_job(tmp_path, pretrained, horovodrun(2, "gloo"),
                          data={"batch_size": 8}, train={"epochs": 50, "max_steps": None, "stall_timeout": 8,
                                                         "log_every": 5})
    stopped = None
    try:
        ranks = rank_pids(proc.pid)
        wait_for(lambda: gone(ranks[0]) or psutil.Process(ranks[0]).cpu_times().user > 8, 120, "training under way")
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)  # a hung node: alive, silent
        start = time.monotonic()
        wait_for(lambda: gone(ranks[0]), 45, "rank 0 to abort")
        elapsed = time.monotonic() - start
    finally:
        if stopped and psutil.pid_exists(stopped):
            os.kill(stopped, signal.SIGKILL)
        text = ""
        try:
            text, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
    assert elapsed < 8 + 20
    assert "[1]" in text and ("stall" in text.lower() or "no progress" in text), text[-3000:]


def test_nan_stops_with_the_step_and_parameters_named(tmp_path, pretrained):
    """The gradient check is read one step late (so the allreduce overlaps the next batch), but
    a checkpoint is written only after it and after checking the weights themselves: no
    checkpoint holds a non-finite weight."""
    doc = small_config(tmp_path, pretrained, optimizer={"lr": 1e38, "momentum": 0.0},
                       train={"max_steps": 6, "checkpoint_every_steps": 1})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 4
    line = proc.stderr.strip().splitlines()[-1]
    # lr 1e38 times a finite gradient: the weights overflow at the first update
    assert line.startswith("distft: error: step 1 ") and "non-finite weights in output.weight" in line
    saved = sorted((tmp_path / "out" / "checkpoints").glob("ckpt-*"))
    assert saved == []
    for ckpt in saved:
        for name, arr in load_params(ckpt / "trainable.params").items():
            assert np.isfinite(arr).all(), (ckpt.name, name)


def test_nan_skip_mode_skips_the_bad_batches_and_finishes_with_finite_weights(tmp_path, pretrained):
    """Black images normalise to 0; any other pixel divided by std 1e-41 (times 255, a float32
    subnormal) is inf, and the gradient it meets turns NaN: only batches holding such an image
    are skipped."""
    rng = np.random.default_rng(0)
    for i in range(40):
        d = tmp_path / "data" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(1, 255, (8, 8, 3), dtype=np.uint8) if i in (3, 20) else np.zeros((8, 8, 3), np.uint8)
        (d / f"{i}.png").write_bytes(png(pixels))
    # features.1, the first convolution, gets an inf input: its weight gradient is NaN (the ReLUs
    # further up squash NaN to 0, so the loss stays finite)
    doc = small_config(tmp_path, pretrained, model={"classes": "auto"}, freeze={"trainable": ["features.1", "output"]},
                       data={"train": str(tmp_path / "data"), "batch_size": 4,
                                                   "mean": [0.0, 0.0, 0.0], "std": [1e-41] * 3},
                       optimizer={"lr": 0.01, "momentum": 0.0}, train={"max_steps": 10, "on_nonfinite": "skip"})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path / "out")
    assert 1 <= s["skipped_steps"] <= 2 and s["steps"] == 10  # the batches holding image 3 or 20
    assert all(np.isfinite(a).all() for a in load_params(tmp_path / "out" / "model.params").values())


def test_finite_gradients_that_overflow_the_weights_stop_in_skip_mode_too(tmp_path, pretrained):
    doc = small_config(tmp_path, pretrained, optimizer={"lr": 1e38, "momentum": 0.0},
                       train={"max_steps": 6, "on_nonfinite": "skip"})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 4
    assert "non-finite weights in output.weight" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "model.params").exists()


def corrupt_image_folder(root, n_good=30, bad=("cat/bad1.png", "dog/bad2.png")):
    rng = np.random.default_rng(0)
    for i in range(n_good):
        d = root / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(png(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)))
    for name in bad:
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")


def test_corrupt_images_are_skipped_and_counted(tmp_path, pretrained):
    corrupt_image_folder(tmp_path / "imgs")
    doc = small_config(tmp_path, pretrained, data={"train": str(tmp_path / "imgs"), "batch_size": 8,
                                                   "max_bad_fraction": 0.2}, train={"max_steps": 8, "epochs": 3},
                       model={"classes": "auto"})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 0, proc.stderr
    imgs = tmp_path / "imgs"
    assert (f"[distft] warning: data.train: 2 unreadable file(s) of 32 left out (limit 10): {imgs}/cat/bad1.png: "
            f"not an image (unknown format, 30 bytes); {imgs}/dog/bad2.png: not an image") in proc.stdout
    assert read_summary(tmp_path / "out")["bad_samples"] == 0  # found before training, never read in it


def test_too_many_corrupt_images_stop_with_the_file_named(tmp_path, pretrained):
    corrupt_image_folder(tmp_path / "imgs")
    doc = small_config(tmp_path, pretrained, data={"train": str(tmp_path / "imgs"), "batch_size": 8,
                                                   "max_bad_fraction": 0.0, "max_bad_files": 1},
                       train={"max_steps": 8, "epochs": 3}, model={"classes": "auto"})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"distft: error: data.train: 2 unreadable files of 32, more than the 1 allowed (max(data.max_bad_fraction x "
        f"files, data.max_bad_files)); first: {tmp_path}/imgs/cat/bad1.png: not an image (unknown format, 30 bytes)")
    assert not (tmp_path / "out" / "config.yaml").exists()  # refused before training, nothing written


def test_output_directory_that_cannot_be_created(tmp_path, pretrained):
    (tmp_path / "afile").write_text("x")
    doc = small_config(tmp_path, pretrained, train={"output": str(tmp_path / "afile" / "run")})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"distft: error: train.output: {tmp_path / 'afile' / 'run'}: cannot write there (Not a directory)"


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, pretrained):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], check=True)
    try:
        doc = small_config(tmp_path, pretrained, train={"output": str(disk / "run"), "max_steps": 6,
                                                        "checkpoint_every_steps": 1, "keep_checkpoints": 5})
        proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert "writing the checkpoint of step" in line and "bytes free there" in line and "is intact" in line
        kept = checkpoint.list_checkpoints(str(disk / "run"))
        assert kept and checkpoint.load(kept[-1]).meta["step"] >= 1  # loads: checksums verified
        assert not [n for n in os.listdir(disk / "run" / "checkpoints") if n.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_corrupted_checkpoint_file_is_a_clear_error(tmp_path, pretrained):
    doc = small_config(tmp_path, pretrained, train={"max_steps": 2})
    cfg = write_config(tmp_path / "c.yaml", doc)
    assert run_cli(["--config", cfg]).returncode == 0
    (ckpt,) = checkpoint.list_checkpoints(str(tmp_path / "out"))
    with open(os.path.join(ckpt, "meta.json"), "w") as fh:
        fh.write("{not json")
    proc = run_cli(["--config", cfg, "--set", "train.max_steps=3"])
    # the only checkpoint is unusable: reported, and the job stops rather than start over on
    # top of the user's run
    assert proc.returncode == 2, proc.stderr
    assert "skipping checkpoint" in proc.stdout and "meta.json: corrupt" in proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("distft: error: train.output: none of the 1 checkpoint(s) in ") and \
        "set train.resume: false or remove them" in line
    assert run_cli(["--config", cfg, "--set", "train.max_steps=3", "--set", "train.resume=false"]).returncode == 0


# --- fuzzed configs: only ever a ConfigError with a message ------------------------------------

SECTIONS = {f.name: [g.name for g in __import__("dataclasses").fields(f.type if isinstance(f.type, type) else
            getattr(__import__("distft.config", fromlist=["x"]), f.type))]
            for f in __import__("dataclasses").fields(Config)}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]),
                 st.text(string.ascii_letters + "._", min_size=1, max_size=15))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=4))
def test_fuzzed_configs_fail_only_with_config_errors(tmp_path_factory, overrides):
    import yaml

    doc: dict = {}
    for key, value in overrides.items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(str(path))
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
