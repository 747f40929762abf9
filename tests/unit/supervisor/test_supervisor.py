"""The supervisor's decisions (distft/supervisor/), without processes: failure classes and the
restart budget, backoff, the world size that divides the global batch, the blacklist's
cool-down, hostfile and discovery parsing, the command line. Its runs on real clusters are in
test_cluster.py (nodes lost) and test_elastic.py (ranks killed)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from processes import wait_for
from distft import launcher
from distft.launchenv import RESTART_ENV, encode_restart, restart_record
from distft.supervisor import hosts as hostlib
from distft.supervisor.policy import Failure, RestartPolicy, backoff_seconds, world_size


def lost(step=10, code=None, hosts=(), started=True, error=""):
    return Failure(rc=1, code=code, started=started, resume_step=step, lost_hosts=list(hosts), error=error)


# --- failure classes ----------------------------------------------------------------------------

@pytest.mark.parametrize("code", [2, 3, 4, 75])
def test_user_errors_nan_and_a_stop_are_never_restarted(code):
    verdict = RestartPolicy(3).decide(lost(code=code))
    assert not verdict.restart and f"exit {code}" in verdict.why


def test_a_lost_node_a_stall_and_a_killed_rank_are_restarted_within_the_budget_for_the_whole_job():
    policy = RestartPolicy(2)
    assert policy.decide(lost(step=5, hosts=["node2"])).restart
    assert policy.decide(lost(step=10, code=5)).restart
    verdict = policy.decide(lost(step=15))
    assert not verdict.restart and "budget is spent (2 of --max-restarts 2)" in verdict.why


def test_a_rank_that_saw_horovod_shut_down_under_it_is_a_lost_peer_not_ranks_that_disagree():
    """Seen in the chaos test: rank 1 SIGKILLed, rank 0 reported first, with exit 3."""
    error = ("distft: error (rank 0): Horovod shut down: another rank failed, was killed or stalled (see the "
             "launcher's message and Horovod's stall report); the last completed checkpoint is intact")
    failure = lost(code=3, error=error)
    assert RestartPolicy(3).decide(failure).restart and failure.reason == "rank_lost"
    assert not RestartPolicy(3).decide(lost(code=3, error="distft: error (rank 1): ranks [1] hold a different "
                                                          "model from rank 0")).restart


def test_exit_3_with_a_node_gone_is_restarted_whatever_line_came_first():
    """Seen on the cluster: node2 cut, rank 0 exited 3 (Horovod shut down), but another rank's
    error line came first."""
    stall = "distft: error (rank 1): no progress for 21 s (train.stall_timeout 20 s)"
    assert RestartPolicy(3).decide(lost(code=3, hosts=["node2"], error=stall)).restart
    failure = Failure(rc=1, code=3, started=True, resume_step=5, error=stall, peer_lost=True)
    assert RestartPolicy(3).decide(failure).restart


def test_reasons_are_a_bounded_set():
    assert lost(hosts=["node2"]).reason == "node_lost"
    assert lost(code=5).reason == "stall"
    assert lost().reason == "rank_lost"
    assert lost(started=False).reason == "startup"


def test_a_failure_before_the_first_step_is_restarted_once():
    policy = RestartPolicy(5)
    assert policy.decide(lost(started=False, error="distft: error: port 1")).restart
    verdict = policy.decide(lost(started=False, error="distft: error: other"))
    assert not verdict.restart and "before its first step twice" in verdict.why


def test_the_same_failure_twice_from_the_same_checkpoint_stops():
    policy = RestartPolicy(5)
    assert policy.decide(lost(step=10, code=1, error="distft: error (rank 1): out of memory at 123")).restart
    verdict = policy.decide(lost(step=10, code=1, error="distft: error (rank 0): out of memory at 456"))
    assert not verdict.restart and "same failure" in verdict.why


def test_the_same_kind_of_failure_after_progress_is_restarted():
    policy = RestartPolicy(5)
    assert policy.decide(lost(step=10)).restart
    assert policy.decide(lost(step=15)).restart  # resumed further on: a new checkpoint in between


# --- backoff --------------------------------------------------------------------------------------

def test_backoff_doubles_from_one_second_to_a_cap_of_60_with_jitter():
    rng = random.Random(0)
    for n, base in [(1, 1), (2, 2), (3, 4), (4, 8), (7, 60), (30, 60)]:
        delays = [backoff_seconds(n, rng) for _ in range(50)]
        assert all(base <= d <= base * 1.25 for d in delays)
        assert len(set(delays)) > 1  # jitter: not the same for every job


# --- world size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("slots, batch, min_np, max_np, expected", [
    (4, 32, 1, None, 4),
    (3, 32, 1, None, 2),      # 3 does not divide 32
    (6, 24, 1, 4, 4),         # --max-np caps it
    (7, 32, 5, None, 0),      # none of 5..7 divides 32: wait for hosts
    (2, 32, 4, None, 0),      # below --min-np
    (5, None, 1, None, 5),    # global batch not known yet: any
])
def test_world_size_is_the_largest_that_fits_and_divides_the_global_batch(slots, batch, min_np, max_np, expected):
    assert world_size(slots, batch, min_np, max_np) == expected


def test_ranks_are_placed_filling_hosts_in_order():
    assert hostlib.place([("a", 2), ("b", 2), ("c", 2)], 3) == [("a", 2), ("b", 1)]


# --- hosts ----------------------------------------------------------------------------------------

def test_a_host_that_fails_twice_is_blacklisted_until_its_cool_down_ends():
    now = [100.0]
    black = hostlib.Blacklist(cooldown=60, clock=lambda: now[0])
    assert not black.failed("node2") and not black.banned("node2")
    assert black.failed("node2") and black.banned("node2")
    now[0] += 59
    assert black.banned("node2")
    now[0] += 2
    assert not black.banned("node2")


def test_hostfile_is_read_again_before_every_launch(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("node1 slots=2\nnode2:2\n")
    source = hostlib.HostSource(hostfile=str(f))
    assert source.read() == [("node1", 2), ("node2", 2)]
    f.write_text("node1 slots=2\n# node2 is gone\n")
    assert source.read() == [("node1", 2)]


def test_a_discovery_script_prints_host_slots_lines(tmp_path):
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho node1:2\necho node3:4\n")
    script.chmod(0o755)
    assert hostlib.HostSource(discovery=str(script)).read() == [("node1", 2), ("node3", 4)]
    script.write_text("#!/bin/sh\necho oops >&2\nexit 3\n")
    with pytest.raises(ValueError, match="--host-discovery-script .*exited 3: oops"):
        hostlib.HostSource(discovery=str(script)).read()


def test_an_unreadable_hostfile_names_itself(tmp_path):
    with pytest.raises(ValueError, match="DISTFT_HOSTFILE .*none"):
        hostlib.HostSource(hostfile=str(tmp_path / "none")).read()


# --- the command line -----------------------------------------------------------------------------

def test_supervisor_options_are_taken_from_among_the_jobs_arguments_and_the_rest_passes_through():
    sup = launcher.build(["--hostfile", "/h", "--slots", "2", "horovodrun", "--gloo", "python", "-m", "distft",
                          "--config", "job.yaml", "--max-restarts", "3", "--min-np=2", "--set", "a=b"], env={})
    assert sup.runner == ["horovodrun"] and sup.runner_args == ["--gloo"]
    assert sup.job == ["python", "-m", "distft", "--config", "job.yaml", "--set", "a=b"]
    assert (sup.options.max_restarts, sup.options.min_np, sup.options.max_np) == (3, 2, None)
    assert sup.source.hostfile == "/h" and sup.source.slots == 2


def test_environment_equivalents_and_a_fixed_host_list():
    sup = launcher.build(["horovodrun", "-np", "4", "-H", "a:2,b:2", "--mpi", sys.executable, "-m", "distft"],
                         env={"DISTFT_MAX_RESTARTS": "2", "DISTFT_WAIT_HOSTS": "7.5"})
    assert sup.options.max_restarts == 2 and sup.options.wait_hosts == 7.5
    assert sup.source.read() == [("a", 2), ("b", 2)]
    assert sup.command(sup.source.read())[:6] == ["horovodrun", "-np", "4", "-H", "a:2,b:2", "--mpi"]


def test_without_elastic_options_it_launches_as_before():
    sup = launcher.build(["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "python", "-m", "distft"], env={})
    assert not sup.options.elastic(sup.source)
    assert sup.hosts_for_launch() == [("localhost", 2)]  # no probe, no resizing


def test_a_bad_option_value_is_one_line_and_exit_2(capsys):
    assert launcher.main(["horovodrun", "python", "-m", "distft", "--max-restarts", "many"]) == 2
    assert "--max-restarts: 'many' is not a whole number" in capsys.readouterr().err


def test_a_relaunched_job_reads_why_and_where_from_its_environment():
    record = {"n": 1, "reason": "node_lost", "hosts": "node1:2", "world_size": 2, "counts": {"node_lost": 1}}
    assert restart_record({RESTART_ENV: encode_restart(record)}) == record
    assert restart_record({}) is None and restart_record({RESTART_ENV: "not base64 json"}) is None


def test_a_launch_on_this_machine_alone_drops_the_network_interface_horovodrun_would_refuse():
    sup = launcher.build(["horovodrun", "--gloo", "--network-interface", "eth0", "--ssh-port", "2222", "python"],
                         env={})
    assert sup.command([("localhost", 2)]) == ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "--ssh-port",
                                               "2222", "python"]
    assert "--network-interface" in sup.command([("node9", 2), ("localhost", 2)])


def test_a_launch_cut_off_before_it_logged_its_checkpoint_keeps_its_segment_up_to_where_the_next_resumed():
    """Seen on the cluster: node2's link was cut while the checkpoint at step 5 was being agreed;
    rank 0 had written it but not yet its `checkpoint` line, and the relaunch resumed there."""
    from distft.components.summary import segments

    records = [{"event": "start", "step": 0, "world_size": 4, "global_batch": 32},
               *({"step": k, "loss": 1.0} for k in range(1, 7)),
               {"event": "start", "step": 5, "world_size": 2, "global_batch": 32},
               {"event": "checkpoint", "step": 10}, {"event": "end", "step": 15}]
    got = [(s["world_size"], s["start_step"], s["end_step"]) for s in segments(records)]
    assert got == [(4, 0, 5), (2, 5, 15)]


# --- the loop, with a stand-in for horovodrun ---------------------------------------------------

FAKE_RUNNER = r"""#!/usr/bin/env python3
# a stand-in for horovodrun: each launch does what the next line of $FAKE_PLAN says
import os, sys, time
plan = os.environ["FAKE_PLAN"]
lines = open(plan).read().splitlines()
step, rest = lines[0], lines[1:]
open(plan, "w").write("\n".join(rest) + "\n")
with open(os.environ["FAKE_SEEN"], "a") as fh:
    fh.write(" ".join(sys.argv[1:5]) + " | " + os.environ.get("DISTFT_RESTART", "-") + "\n")
print("[0]<stdout>:[distft] net: 1 trainable; 2 rank(s) [gloo], global batch 32 (1 x 16 per rank)", flush=True)
def stop_said():
    path = os.environ["DISTFT_STOP_FILE"]
    return os.path.exists(path) and open(path).read() == os.environ["DISTFT_LAUNCH_ID"]
if step == "wait-stop":  # as the ranks do: stop at the next step when the stop file says so
    while not stop_said():
        time.sleep(0.05)
    print("Exit code: 75", flush=True)
    sys.exit(1)
if step.startswith("code"):
    print("Process name: 1\nExit code: " + step[4:], flush=True)
    sys.exit(1)
sys.exit(int(step))
"""


def supervise(tmp_path, plan, *options):
    runner = tmp_path / "fakerun"
    runner.write_text(FAKE_RUNNER)
    runner.chmod(0o755)
    (tmp_path / "plan").write_text("\n".join(plan) + "\n")
    env = {**os.environ, "FAKE_PLAN": str(tmp_path / "plan"), "FAKE_SEEN": str(tmp_path / "seen"),
           "DISTFT_STOP_FILE": str(tmp_path / "stop"), "DISTFT_LAUNCH_ID": "L1", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "distft.launcher", str(runner), "-np", "2", "-H", "localhost:2",
                             "python", "-m", "distft", *options], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_stall_abort_is_relaunched_after_a_backoff_and_the_job_is_told_why(tmp_path):
    proc = supervise(tmp_path, ["code5", "0"], "--max-restarts", "2")
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text
    assert "restart 1 of 2 in 1." in text and "relaunch 1 of 2 (stall): hosts localhost:2, world size 2" in text
    first, second = (tmp_path / "seen").read_text().splitlines()
    assert first.endswith("| -")
    record = restart_record({RESTART_ENV: second.split(" | ")[1]})
    since = record.pop("since")  # the first launch's wall time
    assert record == {"n": 1, "reason": "stall", "hosts": "localhost:2", "world_size": 2, "counts": {"stall": 1}}
    assert 0 < time.time() - since < 300


def test_without_max_restarts_a_failure_is_the_exit_status_and_nothing_is_relaunched(tmp_path):
    proc = supervise(tmp_path, ["code5", "0"])
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 5 and len((tmp_path / "seen").read_text().splitlines()) == 1, text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_are_the_stop_request_and_exit_75(tmp_path, signum):
    proc = supervise(tmp_path, ["wait-stop", "0"], "--max-restarts", "3")
    wait_for(lambda: (tmp_path / "seen").exists(), 30, "the launch")
    time.sleep(0.3)
    proc.send_signal(signum)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, text
    assert (tmp_path / "stop").read_text() == "L1" and f"{signum.name}: stop requested" in text
    assert len((tmp_path / "seen").read_text().splitlines()) == 1  # a stop is never relaunched


def test_a_relaunch_takes_the_largest_world_that_divides_the_global_batch_and_says_so(tmp_path):
    """The discovery script offers 3 slots; the job's global batch (32, from its start-up line)
    needs 2 of them."""
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho localhost:3\n")
    script.chmod(0o755)
    proc = supervise(tmp_path, ["code5", "0"], "--max-restarts", "1", "--host-discovery-script", str(script))
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text
    first, second = [line.split(" | ")[0] for line in (tmp_path / "seen").read_text().splitlines()]
    assert first == "-np 3 -H localhost:3" and second == "-np 2 -H localhost:2"
    assert "3 slots are left, but the job's global batch of 32 samples needs a world size that divides it: 2" in text


def launched(tmp_path):
    seen = tmp_path / "seen"
    return len(seen.read_text().splitlines()) if seen.exists() else 0


def test_a_stop_request_during_the_backoff_exits_75_without_relaunching(tmp_path):
    proc = supervise(tmp_path, ["code5", "code9", "0"], "--max-restarts", "5")  # two different failures
    wait_for(lambda: launched(tmp_path) == 2, 30, "the second launch")
    time.sleep(0.5)  # it failed at once: the supervisor now waits 2-2.5 s before the third
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, text
    assert "stopped before the relaunch" in text and launched(tmp_path) == 2


def test_a_job_below_the_hosts_capacity_stops_at_a_checkpoint_when_hosts_return_and_grows(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {hosts}\n")
    script.chmod(0o755)
    proc = supervise(tmp_path, ["wait-stop", "0"], "--max-restarts", "1", "--host-discovery-script", str(script),
                     "--grow-every", "0.3")
    wait_for(lambda: launched(tmp_path) == 1, 30, "the first launch")
    time.sleep(1)
    hosts.write_text("localhost:4\n")  # two more slots came back
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text
    first, second = [line.split(" | ") for line in (tmp_path / "seen").read_text().splitlines()]
    assert first[0] == "-np 2 -H localhost:2" and second[0] == "-np 4 -H localhost:4"
    record = restart_record({RESTART_ENV: second[1]})
    assert record["reason"] == "grow" and record["world_size"] == 4 and record["counts"] == {"grow": 1}
    assert (tmp_path / "stop").read_text() == "L1"  # the first launch's id: the second has its own
    assert "hosts came back: localhost:4; the ranks stop at the next step" in text


def test_a_host_that_comes_back_while_the_supervisor_waits_for_hosts_is_used(tmp_path, monkeypatch):
    """Probes while waiting for --min-np are no strikes: node2, gone for 60 s of a 300 s wait, was
    banned after two probes (600 s cool-down) and the wait ended in exit 6 naming it."""
    from distft.supervisor import loop

    now = [0.0]
    monkeypatch.setattr(loop.time, "sleep", lambda s: now.__setitem__(0, now[0] + max(s, 0.01)))
    monkeypatch.setattr(loop, "unreachable", lambda names, timeout: [(h, "timed out") for h in names
                                                                    if h == "node2" and now[0] < 60])
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    sup = loop.Supervisor(["horovodrun"], [], ["python", "-m", "distft"], hostlib.HostSource(hostfile=str(hostfile)),
                          loop.Options(max_restarts=3, min_np=4, wait_hosts=300), str(tmp_path / "stop"), "L1",
                          clock=lambda: now[0])
    assert sup.hosts_for_launch() == [("node1", 2), ("node2", 2)]
    assert 60 <= now[0] < 300


def test_a_relaunch_of_a_job_with_resume_false_continues_from_its_own_checkpoints(tmp_path, pretrained):
    """train.resume: false starts a job over; a relaunch by the supervisor must not start it over
    again (it redid all the work), nor take a checkpoint an earlier job left in the folder."""
    from conftest import read_summary, run_cli, small_config, write_config

    doc = small_config(tmp_path, pretrained, train={"max_steps": 4, "checkpoint_every_steps": 2, "resume": False})
    cfg = write_config(tmp_path / "c.yaml", doc)
    old = run_cli(["--config", cfg, "--set", "train.max_steps=6"])  # an earlier job in the same folder
    assert old.returncode == 0, old.stderr[-2000:]
    since = time.time()
    time.sleep(0.05)
    first = run_cli(["--config", cfg, "--set", "train.max_steps=2"])  # this job, cut off after step 2
    assert first.returncode == 0, first.stderr[-2000:]
    record = {"n": 1, "reason": "rank_lost", "hosts": "localhost:1", "world_size": 1, "counts": {"rank_lost": 1},
              "since": since}
    again = run_cli(["--config", cfg], env={RESTART_ENV: encode_restart(record)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "restart 1 (rank_lost): resumed at step 2" in again.stdout, again.stdout[-2000:]
    assert read_summary(tmp_path / "out")["steps_this_run"] == 2
