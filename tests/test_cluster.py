"""Multi-node launches over real ssh, on a cluster of namespaced nodes (tests/cluster.py):
launch/launch.sh with a hostfile, Gloo and MPI, and the stop paths of an MPIJob (the launcher
pod's SIGTERM, a worker pod's SIGTERM). Skipped, with the reason, where the machine cannot host
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
from conftest import MPI_ENV, ROOT, read_summary, small_config, write_config
from processes import logged_steps, wait_for
from distft import checkpoint

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


LONG_RUN = dict(train={"epochs": 50, "max_steps": None, "checkpoint_every_epochs": 0, "log_every": 2})


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
