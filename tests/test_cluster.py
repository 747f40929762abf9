"""Multi-node launches over real ssh, on a cluster of namespaced nodes (tests/cluster.py):
launch/launch.sh with a hostfile, Gloo and MPI. Skipped, with the reason, where the machine
cannot host the cluster (not root, no `ip netns`); CI runs as root, so they run there."""
import json
import os
import subprocess

import pytest

import cluster
from conftest import MPI_ENV, ROOT, read_summary, small_config, write_config

pytestmark = pytest.mark.horovod


@pytest.fixture
def two_nodes(tmp_path):
    reason = cluster.why_not()
    if reason:
        pytest.skip(reason)
    nodes = cluster.Cluster(2, str(tmp_path / "cluster"))
    try:
        yield nodes.start()
    finally:
        nodes.close()


def launch_on(nodes, node, tmp_path, args, controller="gloo", env=None):
    """launch/launch.sh on `node`, with the hostfile node1 slots=2, node2 slots=2."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n.name} slots=2\n" for n in nodes.nodes))
    full_env = {**os.environ, **MPI_ENV, "DISTFT_HOSTFILE": str(hostfile), "DISTFT_CONTROLLER": controller,
                "DISTFT_SSH_PORT": str(cluster.SSH_PORT), "DISTFT_IFACE": "eth0", **(env or {})}
    return nodes.run(node, ["bash", os.path.join(ROOT, "launch", "launch.sh")] + args, cwd=ROOT, env=full_env,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_launch_sh_runs_two_nodes_of_two_ranks_over_ssh(tmp_path, pretrained, two_nodes, controller):
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, train={"max_steps": 4}))
    proc = launch_on(two_nodes, two_nodes.nodes[0], tmp_path, ["--config", cfg], controller)
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
