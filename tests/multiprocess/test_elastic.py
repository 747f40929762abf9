"""launch.sh --max-restarts on one machine: ranks SIGKILLed at random steps are relaunched from
the last checkpoint and end where an uninterrupted run ends; a config error is never
restarted. (Nodes lost for good, and too few hosts, on the namespace cluster: test_cluster.py.)"""
import os
import random
import signal
import subprocess
import time

import psutil
import pytest

from conftest import MPI_ENV, ROOT, assert_same_weights, read_summary, run_cli, small_config, write_config
from processes import kill_tree, logged_steps, wait_for

pytestmark = pytest.mark.horovod

STEPS, RANKS = 10, 2
CHAOS = dict(data={"global_batch": 16}, metrics={"probe_batches": 0}, train={"epochs": 50, "max_steps": STEPS, "checkpoint_every_steps": 2,
                                                "keep_checkpoints": 2, "log_every": 1, "stall_timeout": 30})


def launch(args, env=None):
    full = {**os.environ, **MPI_ENV, "DISTFT_NP": str(RANKS), "DISTFT_CONTROLLER": "gloo",
            "DISTFT_STOP_FILE": "/nonexistent/distft.stop", **(env or {})}
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "launch.sh")] + args, cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rank_pid(launcher, rank, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                env = p.environ()
                if "distft" in p.cmdline() and str(rank) in (env.get("HOROVOD_RANK"), env.get("OMPI_COMM_WORLD_RANK")):
                    return p.pid
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise TimeoutError(f"rank {rank} not found")


@pytest.mark.slow
def test_chaos_a_rank_sigkilled_at_a_random_step_is_relaunched_and_ends_where_an_uninterrupted_run_ends(
        tmp_path, pretrained):
    """5 seeded runs on one machine, 2 ranks each (a stand-in for nodes: the two-node form costs
    twice the time), under Gloo and MPI in turn; the reference is one process taking the same
    global batch of 16."""
    reference = small_config(tmp_path, pretrained, **CHAOS)
    reference["train"]["output"] = str(tmp_path / "reference")
    alone = run_cli(["--config", write_config(tmp_path / "reference.yaml", reference)])
    assert alone.returncode == 0, alone.stderr[-3000:]
    budget = 2
    for seed in range(5):
        rng = random.Random(seed)
        rank, at_step = rng.randrange(RANKS), rng.randint(1, STEPS - 1)
        controller = ("gloo", "mpi")[seed % 2]  # both of horovodrun's: mpirun reports a kill its own way
        doc = small_config(tmp_path, pretrained, **CHAOS)
        out = tmp_path / f"run{seed}"
        doc["train"]["output"] = str(out)
        cfg = write_config(tmp_path / f"run{seed}.yaml", doc)
        proc = launch(["--config", cfg, "--max-restarts", str(budget), "--restart-seed", str(seed)],
                      {"DISTFT_CONTROLLER": controller})
        try:
            victim = rank_pid(proc, rank)
            wait_for(lambda: (logged_steps(out) or [0])[-1] >= at_step, 180, f"step {at_step}")
            os.kill(victim, signal.SIGKILL)
            text, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        assert proc.returncode == 0, f"seed {seed} ({controller}): rank {rank} killed at step {at_step}\n{text[-4000:]}"
        s = read_summary(out)
        assert s["steps"] == STEPS
        assert 1 <= len(s["restarts"]) <= budget and s["restarts"][0]["reason"] == "rank_lost", s["restarts"]
        assert "relaunch 1 of 2 (rank_lost): hosts localhost:2, world size 2" in text
        assert_same_weights(out / "model.params", tmp_path / "reference" / "model.params")


def test_a_config_error_under_max_restarts_exits_2_at_once_without_a_restart(tmp_path, pretrained):
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, data={"train": str(tmp_path / "nowhere")}))
    proc = launch(["--config", cfg, "--max-restarts", "3"])
    try:
        text, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 2, text[-3000:]
    assert "nowhere" in text and "not restarted: exit 2: a config, data or checkpoint error" in text
    assert text.count("[launch] horovodrun -np") == 1
