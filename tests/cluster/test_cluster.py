"""Multi-node launches over real ssh, on a cluster of namespaced nodes (tests/support/cluster.py):
launch/launch.sh with a hostfile, Gloo and MPI, the stop paths of an MPIJob (the launcher
pod's SIGTERM, a worker pod's SIGTERM), and a two-node Slurm (tests/support/slurm.py): its time-limit
signal, `scontrol requeue` and `scancel`. Skipped, with the reason, where the machine cannot host
the cluster (not root, no `ip netns`); CI runs as root, so they run there."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import cluster
import mpijob
import slurm
from conftest import MPI_ENV, ROOT, assert_same_weights, kustomize, read_summary, run_cli, small_config, write_config
from processes import logged_steps, wait_for
from distft.components import checkpoint

pytestmark = pytest.mark.horovod


@pytest.fixture
def cluster_of(tmp_path):
    """cluster_of(n): n nodes, torn down after the test whatever happens."""
    reason = cluster.why_not()
    if reason:
        pytest.skip(reason)
    made = []

    def make(n):
        nodes = cluster.Cluster(n, str(tmp_path / "cluster"))
        made.append(nodes)
        return nodes.start()

    try:
        yield make
    finally:
        for nodes in made:
            nodes.close()


def launch_on(nodes, node, tmp_path, args, hosts, controller="gloo", env=None):
    """launch/launch.sh on `node`, with the hostfile `host slots=2` for each of `hosts`."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n.name} slots=2\n" for n in hosts))
    full_env = {**os.environ, **MPI_ENV, "DISTFT_HOSTFILE": str(hostfile), "DISTFT_CONTROLLER": controller,
                "DISTFT_SSH_PORT": str(cluster.SSH_PORT), "DISTFT_IFACE": "eth0",
                "DISTFT_STOP_FILE": cluster.STOP_FILE, **(env or {})}
    return nodes.run(node, ["bash", os.path.join(ROOT, "launch", "launch.sh")] + args, cwd=ROOT, env=full_env,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_launch_sh_runs_two_nodes_of_two_ranks_over_ssh(tmp_path, pretrained, cluster_of, controller):
    nodes = cluster_of(2)
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, train={"max_steps": 4}))
    proc = launch_on(nodes, nodes.nodes[0], tmp_path, ["--config", cfg], nodes.nodes, controller)
    text, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, text[-4000:]
    assert "[launch] horovodrun -np 4 -H node1:2,node2:2" in text
    s = read_summary(tmp_path / "out")
    assert s["world_size"] == 4 and s["backend"] == controller and s["steps"] == 4
    assert [(p["host"], p["cross_rank"], p["local_rank"]) for p in s["rank_placement"]] == \
        [("node1", 0, 0), ("node1", 0, 1), ("node2", 1, 0), ("node2", 1, 1)]
    assert len(s["rank_state_digests"]) == 4 and len(set(s["rank_state_digests"])) == 1
    # one writer (rank 0) for the shared output: one start and one end in its log
    events = [json.loads(line).get("event") for line in open(tmp_path / "out" / "log.jsonl")]
    assert events.count("start") == 1 and events.count("done") == 1


# stopped by a signal, never run to its end: it must outlast Slurm's time-limit signal (30-60 s
# after the start); 50 epochs (1,100 steps) once ended in about 30 s on 2 nodes
LONG_RUN = dict(train={"epochs": 1000, "max_steps": None, "checkpoint_every_epochs": 0, "log_every": 2})


def worker_grace_seconds():
    job = yaml.safe_load(open(os.path.join(ROOT, "k8s", "base", "mpijob.yaml")))
    return job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["terminationGracePeriodSeconds"]


def stopped_at(text):
    return int(text.split("preempted (SIGTERM) at step ")[1].split(";")[0])


def test_sigterm_to_a_worker_pods_pid_1_stops_every_rank_with_a_checkpoint_and_the_relaunch_resumes(
        tmp_path, pretrained, cluster_of):
    """An MPIJob rehearsed: node3 is the launcher (no ranks), node1 and node2 are worker pods
    whose PID 1 is worker.sh. Only node2's PID 1 gets SIGTERM, as in a pod eviction; the
    checkpoint takes 20 s to write."""
    nodes = cluster_of(3)
    node1, node2, node3 = nodes.nodes
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, **LONG_RUN))
    out = tmp_path / "out"
    proc = launch_on(nodes, node3, tmp_path, ["--config", cfg], [node1, node2],
                     env={"DISTFT_FAULT_CHECKPOINT_DELAY": "20"})
    try:
        wait_for(lambda: logged_steps(out), 240, "training steps")
        sent = time.monotonic()
        node2.terminate()  # the pod's PID 1 only
        time.sleep(10)
        assert node2.init.poll() is None  # worker.sh waits while its ranks write the 20 s checkpoint
        text, _ = proc.communicate(timeout=worker_grace_seconds())
        took = time.monotonic() - sent
        assert node2.init.wait(timeout=30) == 0  # worker.sh saw its ranks leave, then stopped sshd
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, text[-4000:]
    assert 20 <= took < worker_grace_seconds()
    step = stopped_at(text)
    assert checkpoint.latest(str(out)).meta["step"] == step
    assert node1.init.poll() is None  # the other pod lives on
    nodes.boot(node2)  # the pod, rescheduled
    again = launch_on(nodes, node3, tmp_path, ["--config", cfg, "--set", f"train.max_steps={step + 3}"],
                      [node1, node2])
    text2, _ = again.communicate(timeout=400)
    assert again.returncode == 0, text2[-4000:]
    s = read_summary(out)
    assert s["resumed"] and s["steps"] == step + 3 and s["world_size"] == 4


def test_sigterm_to_a_launcher_without_ranks_reaches_a_rank_on_another_node(tmp_path, pretrained, cluster_of):
    """The launcher pod's eviction: the launcher runs no rank, so its stop request goes over
    ssh to the first host's stop file."""
    nodes = cluster_of(3)
    node1, node2, node3 = nodes.nodes
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, **LONG_RUN))
    out = tmp_path / "out"
    proc = launch_on(nodes, node3, tmp_path, ["--config", cfg], [node1, node2])
    try:
        wait_for(lambda: logged_steps(out), 240, "training steps")
        os.kill(proc.command_pid, signal.SIGTERM)  # launch.sh itself, not nsenter around it
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, text[-4000:]
    assert checkpoint.latest(str(out)).meta["step"] == stopped_at(text)
    # the request went to the first host's own stop file (each node has its own), and only there
    assert os.path.exists(os.path.join(nodes.dir, "node1", "run", "stop"))
    assert not os.path.exists(os.path.join(nodes.dir, "node2", "run", "stop"))


def test_a_partitioned_node_ends_the_job_within_the_stall_timeout_naming_it_and_the_relaunch_resumes(
        tmp_path, pretrained, cluster_of):
    nodes = cluster_of(2)
    node1, node2 = nodes.nodes
    stall = 20
    cfg = write_config(tmp_path / "job.yaml", small_config(
        tmp_path, pretrained, train={"epochs": 50, "max_steps": None, "checkpoint_every_steps": 5,
                                     "keep_checkpoints": 2, "log_every": 5, "stall_timeout": stall}))
    out = tmp_path / "out"
    proc = launch_on(nodes, node1, tmp_path, ["--config", cfg], nodes.nodes)
    try:
        wait_for(lambda: checkpoint.list_checkpoints(str(out)), 240, "a first checkpoint")
        cut = time.monotonic()
        node2.link(up=False)
        text, _ = proc.communicate(timeout=stall + 60)
        took = time.monotonic() - cut
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, 75), text[-4000:]
    assert took < stall + 60
    assert "[launch] node2 is unreachable" in text and "[launch] node1 is unreachable" not in text
    last = checkpoint.latest(str(out)).meta["step"]
    node2.link(up=True)
    again = launch_on(nodes, node1, tmp_path, ["--config", cfg, "--set", f"train.max_steps={last + 3}"],
                      nodes.nodes)
    text2, _ = again.communicate(timeout=400)
    assert again.returncode == 0, text2[-4000:]
    s = read_summary(out)
    assert s["resumed"] and s["steps"] == last + 3 and s["world_size"] == 4


def launches(out):
    """log.jsonl's records, split at each launch's "start" event."""
    runs = []
    for line in open(out / "log.jsonl"):
        record = json.loads(line)
        if record.get("event") == "start":
            runs.append([])
        if runs:
            runs[-1].append(record)
    return runs


def training_again(out):
    """The second launch has logged a step."""
    try:
        runs = launches(out)
    except OSError:
        return False
    return len(runs) >= 2 and any("step" in r and "event" not in r for r in runs[1])


@pytest.mark.slow
def test_a_node_lost_for_good_is_dropped_and_the_job_ends_on_the_rest_where_an_uninterrupted_run_ends(
        tmp_path, pretrained, cluster_of):
    """2 nodes x 2 slots under launch.sh --max-restarts 3; node2's link is cut for good after a
    checkpoint. The reference: one process taking the same global batch of 32."""
    stall = 20
    doc = small_config(tmp_path, pretrained, data={"global_batch": 32}, metrics={"probe_batches": 0},
                       train={"epochs": 50, "max_steps": 15, "checkpoint_every_steps": 5, "keep_checkpoints": 2,
                              "log_every": 1, "stall_timeout": stall})
    reference = {**doc, "train": {**doc["train"], "output": str(tmp_path / "reference")}}
    alone = run_cli(["--config", write_config(tmp_path / "reference.yaml", reference)])
    assert alone.returncode == 0, alone.stderr[-3000:]
    nodes = cluster_of(2)
    node1, node2 = nodes.nodes
    out = tmp_path / "out"
    proc = launch_on(nodes, node1, tmp_path, ["--config", write_config(tmp_path / "job.yaml", doc),
                                              "--max-restarts", "3", "--min-np", "2"], nodes.nodes)
    try:
        wait_for(lambda: checkpoint.list_checkpoints(str(out)), 240, "a first checkpoint")
        cut = time.monotonic()
        node2.link(up=False)
        try:
            wait_for(lambda: training_again(out), stall + 60, "training again on node1 alone")
        except TimeoutError:
            proc.kill()
            pytest.fail(f"not training again {stall + 60} s after the cut:\n" + proc.communicate()[0][-5000:])
        took = time.monotonic() - cut
        text, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-4000:]
    assert took < stall + 60
    assert "[launch] node2 is unreachable" in text and "[launch] node1 is unreachable" not in text
    assert "[launch] horovodrun -np 2 -H node1:2 " in text
    s = read_summary(out)
    assert s["steps"] == 15 and [seg["world_size"] for seg in s["segments"]] == [4, 2]
    assert s["restarts"] == [{"at_step": s["segments"][1]["start_step"], "reason": "node_lost", "hosts": ["node1:2"],
                              "world_size": 2}]
    assert_same_weights(out / "model.params", tmp_path / "reference" / "model.params")
    print(f"training again {took:.1f} s after the cut (stall_timeout {stall} s)")


def test_below_min_np_the_supervisor_waits_for_hosts_then_exits_naming_the_missing_one(
        tmp_path, pretrained, cluster_of):
    nodes = cluster_of(2)
    node1, node2 = nodes.nodes
    node2.link(up=False)
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained))
    start = time.monotonic()
    proc = launch_on(nodes, node1, tmp_path, ["--config", cfg, "--max-restarts", "3", "--min-np", "4",
                                              "--wait-hosts", "8"], nodes.nodes)
    try:
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - start
    assert proc.returncode == 6, text[-3000:]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("[launch] too few hosts")]
    assert "--min-np 4" in line and "missing: node2 unreachable" in line and "node1 " not in line.split("missing")[1]
    assert 8 <= took < 8 + 40
    assert "[launch] horovodrun" not in text  # nothing was started


def promql_on(nodes, node, port, query):
    """A Prometheus query, asked from `node` (the server listens only inside the cluster)."""
    fetch = ("import json, sys, urllib.parse, urllib.request; "
             "url = sys.argv[1] + '/api/v1/query?' + urllib.parse.urlencode({'query': sys.argv[2]}); "
             "print(json.dumps(json.load(urllib.request.urlopen(url, timeout=5))['data']['result']))")
    proc = nodes.run(node, [sys.executable, "-c", fetch, f"http://{node.address}:{port}", query],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    return json.loads(out) if proc.returncode == 0 else None


def test_prometheus_scrapes_every_rank_on_metrics_port_plus_local_rank(tmp_path, pretrained, cluster_of):
    nodes = cluster_of(2)
    node1, node2 = nodes.nodes
    targets = [f"{n.name}:{9400 + local}" for n in nodes.nodes for local in (0, 1)]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 900ms}\n"
        "scrape_configs:\n"
        "  - job_name: distft\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
    prom = nodes.run(node1, ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={node1.address}:9090"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = write_config(tmp_path / "job.yaml", small_config(
        tmp_path, pretrained, train={"max_steps": 20, "log_every": 5},
        metrics={"port": 9400, "linger_seconds": 10, "job": "clustertest"}))
    job = launch_on(nodes, node1, tmp_path, ["--config", cfg], nodes.nodes)
    try:
        wait_for(lambda: len(promql_on(nodes, node1, 9090, 'distft_steps_total{job="clustertest"} >= 20') or []) == 4,
                 120, "Prometheus seeing all four ranks finish")
        seen = promql_on(nodes, node1, 9090, 'distft_steps_total{job="clustertest"}')
        text, _ = job.communicate(timeout=120)
        assert job.returncode == 0, text[-3000:]
    finally:
        for p in (job, prom):
            if p.poll() is None:
                p.kill()
    where = sorted((m["metric"]["host"], m["metric"]["local_rank"], m["metric"]["rank"], m["metric"]["instance"])
                   for m in seen)
    assert where == [("node1", "0", "0", "node1:9400"), ("node1", "1", "1", "node1:9401"),
                     ("node2", "0", "2", "node2:9400"), ("node2", "1", "3", "node2:9401")]


# --- Slurm on two nodes ------------------------------------------------------------------------

@pytest.fixture
def slurm_on(tmp_path, cluster_of):
    """slurm_on(n): n namespace nodes, each with a slurmd (slurmctld on node1), torn down after
    the test (the Slurm daemons first, then the nodes)."""
    made = []

    def make(n):
        nodes = cluster_of(n)
        made.append(slurm.Slurm(str(tmp_path / "slurm"), [slurm.Place(node.name, node.address, node.enter, cluster.RUN_DIR)
                                                          for node in nodes.nodes]))
        return made[-1].start()

    try:
        yield make
    finally:
        for s in made:
            s.close()


def sbatch(s, tmp_path, args, *options, env=None):
    """launch/slurm/distft.sbatch on 2 nodes x 2 tasks; returns the job id."""
    done = s.client(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path / 'slurm-%j.out'}",
                     *options, "launch/slurm/distft.sbatch"] + args, cwd=ROOT,
                    env={**MPI_ENV, "DISTFT_VENV": sys.prefix, "DISTFT_IFACE": "eth0", **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY"}


def wait_for_end(s, job_id, timeout):
    wait_for(lambda: s.job(job_id).get("JobState") in ENDED, timeout, f"slurm job {job_id} to end")
    return s.job(job_id)


def slurm_log(tmp_path):
    return "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))


def test_slurm_time_limit_signal_on_two_nodes_waits_for_a_slow_checkpoint_and_exits_75(tmp_path, pretrained, slurm_on):
    """distft.sbatch's ranks are srun tasks, so the time-limit signal (--signal=TERM@N, no B:)
    reaches every rank on both nodes from Slurm itself. slurmctld looks every 30 s and signals
    once the limit is at most N + 30 s away (measured): @60 in a 2-minute job signals 30-60 s
    after the start, once the ranks are up (a SIGTERM before distft's handler would kill a
    rank), and the checkpoint, slowed to 20 s, is written before the limit."""
    s = slurm_on(2)
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, **LONG_RUN))
    out = tmp_path / "out"
    job_id = sbatch(s, tmp_path, ["--config", cfg, "--set", f"train.output={out}"], "--time=2", "--signal=TERM@60",
                    env={"DISTFT_FAULT_CHECKPOINT_DELAY": "20"})
    job = wait_for_end(s, job_id, 300)
    logs = slurm_log(tmp_path)
    assert job["ExitCode"] == "75:0" and job["JobState"] == "FAILED", f"{job}\n{logs[-3000:]}"  # not TIMEOUT
    step = stopped_at(logs)
    assert checkpoint.latest(str(out)).meta["step"] == step
    assert "node1: tasks 0-1: Exited with exit code 75" in logs and "node2: tasks 2-3: Exited with exit code 75" in logs


def test_scontrol_requeue_checkpoints_exits_75_the_requeued_job_resumes_and_scancel_ends_it_in_bounded_time(
        tmp_path, pretrained, slurm_on):
    s = slurm_on(2)
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, **LONG_RUN))
    out = tmp_path / "out"
    job_id = sbatch(s, tmp_path, ["--config", cfg, "--set", f"train.output={out}"])
    wait_for(lambda: logged_steps(out), 240, "training steps")
    assert s.client(["scontrol", "requeue", job_id]).returncode == 0
    # the first run stops at an agreed step with a checkpoint, every task exits 75 ...
    wait_for(lambda: "node2: tasks 2-3: Exited with exit code 75" in slurm_log(tmp_path), 120, "the first run's exit")
    first = stopped_at(slurm_log(tmp_path))
    assert checkpoint.latest(str(out)).meta["step"] == first
    assert "node1: tasks 0-1: Exited with exit code 75" in slurm_log(tmp_path)

    # ... and the requeued job (same id, --requeue) resumes there: its steps follow on
    def events():
        return [json.loads(line) for line in open(out / "log.jsonl")]

    wait_for(lambda: [e["step"] for e in events() if e.get("event") == "start"] == [0, first]
             and logged_steps(out)[-1] > first, 240, "the requeued job's steps")
    assert s.job(job_id)["Restarts"] == "1"
    records = events()
    resumed_at = [i for i, e in enumerate(records) if e.get("event") == "start"][1]
    after = [e["step"] for e in records[resumed_at:] if "step" in e and "event" not in e]
    assert first < after[0] <= first + 2 and after == sorted(after)  # log_every 2: none lost or repeated

    # scancel: Slurm SIGTERMs every task; they stop at the next step with a checkpoint, well
    # before KillWait's SIGKILL
    sent = time.monotonic()
    assert s.client(["scancel", job_id]).returncode == 0
    job = wait_for_end(s, job_id, s.kill_wait + 60)
    took = time.monotonic() - sent
    assert job["JobState"] == "CANCELLED"
    assert took < s.kill_wait, f"scancel took {took:.1f} s"
    assert checkpoint.latest(str(out)).meta["step"] > first


# --- the MPIJob, rendered, with the operator's part played here -------------------------------

# gpu-2x4's job (resnet50 on /data/train.rec, pretrained weights on the volume) has no data here:
# its 8 ranks run two steps of the demo digits on a small model instead, on CPU
TINY_JOB = ["--set", "model.name=resnet18_v2", "--set", "model.classes=5", "--set", "model.pretrained=false",
            "--set", "model.image_size=32", "--set", "data.train=demo", "--set", "data.val=null",
            "--set", "data.batch_size=2", "--set", "data.augment=false", "--set", "train.max_steps=2",
            "--set", "optimizer.warmup_steps=0", "--set", "train.checkpoint_every_steps=null"]


@pytest.mark.parametrize("overlay, extra", [("cpu-smoke", []), ("gpu-2x4", TINY_JOB)])
def test_the_rendered_mpijob_runs_replicas_times_slots_ranks_as_uid_1000_over_the_operators_ssh_keys(
        tmp_path, overlay, extra):
    reason = cluster.why_not()
    if reason:
        pytest.skip(reason)
    docs = kustomize(overlay)
    (job,) = [d for d in docs if d["kind"] == "MPIJob"]
    configs = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pods = mpijob.MPIJobCluster(job, configs, claims, str(tmp_path / "pods"))
    try:
        pods.start()  # the worker pods, until every one is ready
        for worker in pods.nodes[:-1]:  # PID 1 of each is the Worker container's command, as runAsUser
            status = open(f"/proc/{worker.pid1}/status").read()
            assert f"\nUid:\t{pods.uid}\t" in status and "worker.sh" in open(f"/proc/{worker.pid1}/cmdline").read()
        launcher = pods.run_launcher(extra)
        text, _ = launcher.communicate(timeout=400)
    finally:
        pods.close()
    assert launcher.returncode == 0, text[-4000:]
    cfg = yaml.safe_load(next(iter(configs.values()))["job.yaml"])
    out = tmp_path / "pods" / "data" / os.path.relpath(cfg["train"]["output"], "/data")
    s = read_summary(out)
    assert s["world_size"] == pods.replicas * pods.slots == {"cpu-smoke": 2, "gpu-2x4": 8}[overlay]
    assert sorted({p["host"] for p in s["rank_placement"]}) == [f"{job['metadata']['name']}-worker-{i}"
                                                                 for i in range(pods.replicas)]
    assert os.stat(out / "summary.json").st_uid == pods.uid  # rank 0 wrote it as the pods' user
    assert f"[launch] horovodrun -np {s['world_size']} -H " in text
