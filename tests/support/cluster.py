"""A cluster of N "nodes" on this machine, for tests of multi-node launches over real ssh.

Each node is a network namespace (`ip netns`) with an `eth0` on a bridge that lives in a
namespace of its own, so the addresses (10.201.0.0/24) exist only inside these namespaces and
nothing reaches a real network. On each node, `unshare --uts --mount --pid` gives its processes
their own process tree, with the node's first process as PID 1 (as in a pod: signals from
outside reach it only through a handler, and when it ends the kernel ends the rest), their own
hostname (node1, node2, ...: Gloo tells nodes apart by hostname) and, bind-mounted, their
own /etc/hosts, /root/.ssh (a generated key, and launch/ssh/ssh_config: root's real ~/.ssh is
never touched) and RUN_DIR (node-local files such as STOP_FILE). The node's first process is
launch/worker.sh, the MPIJob worker's entry point: an sshd on port 2222. The nodes share the
root filesystem, so the repository, the virtualenv and the test's tmp_path are at the same
paths everywhere.

Needs root and `ip netns`; `why_not` says why not. `Cluster.close` removes everything,
and the fixture calls it even when the test fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SUBNET = "10.201.0"
SSH_PORT = 2222
RUN_DIR = "/run/distft-node"  # a different directory on each node
STOP_FILE = f"{RUN_DIR}/stop"


def why_not() -> str | None:
    """The reason this machine cannot host a cluster, or None."""
    if os.geteuid() != 0:
        return "namespace cluster needs root (ip netns, unshare --mount)"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"namespace cluster needs {tool}"
    if not os.path.exists("/usr/sbin/sshd"):
        return "namespace cluster needs /usr/sbin/sshd (apt-get install openssh-server)"
    probe = f"dftprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns is unavailable here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    made = subprocess.run(["unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        return f"unshare --uts --mount --pid is unavailable here: {made.stderr.strip()}"
    return None


def _ip(*args, ns=None, check=True):
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


class Node:
    def __init__(self, cluster: "Cluster", index: int):
        self.cluster, self.index = cluster, index
        self.name = f"node{index + 1}"
        self.netns = f"{cluster.prefix}n{index + 1}"
        self.veth = f"{cluster.prefix}v{index + 1}"  # its end on the bridge
        self.address = f"{SUBNET}.{index + 1}"
        self.init = None  # `unshare`, which waits for the node's PID 1 and returns its status
        self.pid1 = None  # the node's PID 1 (worker.sh), as this machine numbers it

    def wrap(self, command: list[str]) -> list[str]:
        """`command` run as this node's first process: new UTS and mount namespaces inside the
        node's network namespace, hostname and bind mounts set, then exec."""
        d = self.cluster.dir
        setup = (f"hostname {self.name} && mount --bind {d}/hosts /etc/hosts && "
                 f"mount --bind {d}/dotssh /root/.ssh && mount --bind {d}/{self.name}/run {RUN_DIR} && "
                 f"exec \"$@\"")
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "--pid", "--fork", "--mount-proc", "sh", "-c", setup, "node"] + command

    def enter(self, command: list[str]) -> list[str]:
        """`command` run on this node (inside the namespaces of its PID 1)."""
        return ["nsenter", "-t", str(self.pid1), "--net", "--uts", "--mount", "--pid"] + command

    def terminate(self) -> None:
        """What Kubernetes does to a pod that is evicted or deleted: SIGTERM to its PID 1 only."""
        os.kill(self.pid1, signal.SIGTERM)

    def link(self, up: bool) -> None:
        """Plug or unplug the node's cable (its veth end on the bridge)."""
        _ip("link", "set", self.veth, "up" if up else "down", ns=self.cluster.bridge_ns)


class Cluster:
    def __init__(self, n: int, workdir: str):
        self.prefix = f"dft{os.getpid() % 100000}"
        self.bridge_ns = f"{self.prefix}br"
        self.dir = workdir
        self.nodes = [Node(self, i) for i in range(n)]
        self.namespaces: list[str] = []

    def start(self) -> "Cluster":
        os.makedirs(self.dir, exist_ok=True)
        self._files()
        _ip("netns", "add", self.bridge_ns)
        self.namespaces.append(self.bridge_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        _ip("link", "set", "br0", "up", ns=self.bridge_ns)
        for node in self.nodes:
            _ip("netns", "add", node.netns)
            self.namespaces.append(node.netns)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns,
                ns=self.bridge_ns)
            _ip("link", "set", node.veth, "master", "br0", "up", ns=self.bridge_ns)
            _ip("addr", "add", f"{node.address}/24", "dev", "eth0", ns=node.netns)
            _ip("link", "set", "eth0", "up", ns=node.netns)
            _ip("link", "set", "lo", "up", ns=node.netns)
        os.makedirs("/run/sshd", exist_ok=True)  # root's sshd wants its privilege separation directory
        for mount_point in ("/root/.ssh", RUN_DIR):  # where each node mounts its own
            os.makedirs(mount_point, mode=0o700, exist_ok=True)
        for node in self.nodes:
            self.boot(node, wait=False)
        for node in self.nodes:
            self._wait_for_sshd(node)
        return self

    def boot(self, node: Node, wait: bool = True) -> None:
        """Start the node's first process, worker.sh (again: a pod that was rescheduled)."""
        os.makedirs(os.path.join(self.dir, node.name, "run"), exist_ok=True)
        log_path = os.path.join(self.dir, f"{node.name}-sshd.log")
        log = open(log_path, "a")
        node.init = subprocess.Popen(
            node.wrap(["bash", os.path.join(ROOT, "launch", "worker.sh"),
                       "-o", f"AuthorizedKeysFile={self.dir}/dotssh/authorized_keys"]),
            env={**os.environ, "DISTFT_SSHD_DIR": os.path.join(self.dir, node.name), "DISTFT_STOP_FILE": STOP_FILE},
            stdout=log, stderr=subprocess.STDOUT)
        node.pid1 = self._child_of(node.init, log_path)
        if wait:
            self._wait_for_sshd(node)

    def _files(self) -> None:
        with open(os.path.join(self.dir, "hosts"), "w") as fh:
            fh.write("127.0.0.1 localhost\n" + "".join(f"{n.address} {n.name}\n" for n in self.nodes))
        dotssh = os.path.join(self.dir, "dotssh")
        os.makedirs(dotssh, mode=0o700, exist_ok=True)
        key = os.path.join(dotssh, "id_ed25519")
        if not os.path.exists(key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        shutil.copy(key + ".pub", os.path.join(dotssh, "authorized_keys"))
        # the client settings the images install (port 2222, no known_hosts)
        shutil.copy(os.path.join(ROOT, "launch", "ssh", "ssh_config"), os.path.join(dotssh, "config"))

    @staticmethod
    def _child_of(proc: subprocess.Popen, log: str = "", seconds: float = 10) -> int:
        """The pid of `proc`'s first child (the node's process under unshare/nsenter). If there is
        none, the error says whether `proc` exited (and how) or hung, with its log's tail: seen
        once in CI, not reproduced since."""
        pid = proc.pid
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as fh:
                    children = fh.read().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            time.sleep(0.05)
        state = f"exited {proc.returncode}" if proc.poll() is not None else f"still running after {seconds:.0f} s"
        tail = ""
        if log:
            try:
                with open(log) as fh:
                    tail = fh.read()[-1500:]
            except OSError:
                pass
        raise RuntimeError(f"{proc.args[0]} (pid {pid}) started no node process ({state}): {proc.args}\n{tail}")

    def _wait_for_sshd(self, node: Node, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if node.init.poll() is not None:
                raise RuntimeError(f"{node.name}: worker.sh exited {node.init.returncode}: " + self.sshd_log(node))
            probe = subprocess.run(node.enter(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                                               node.name, "hostname"]), capture_output=True, text=True)
            if probe.returncode == 0 and probe.stdout.strip() == node.name:
                return
            time.sleep(0.3)
        raise RuntimeError(f"{node.name}: sshd never accepted a login: {probe.stderr.strip()} "
                           + self.sshd_log(node))

    def sshd_log(self, node: Node) -> str:
        try:
            return open(os.path.join(self.dir, f"{node.name}-sshd.log")).read()[-1500:]
        except OSError:
            return ""

    def run(self, node: Node, command: list[str], **kw) -> subprocess.Popen:
        """Start `command` on `node`. It runs as a child of nsenter (which waits for it and
        returns its status); `.command_pid` is its own pid, for signals meant for it alone."""
        proc = subprocess.Popen(node.enter(command), **kw)
        try:
            proc.command_pid = self._child_of(proc)
        except RuntimeError:
            if proc.poll() != 0:
                raise
            proc.command_pid = None  # a quick command, done and successful before it was seen: no pid to signal
        return proc

    def close(self) -> None:
        """Every process in the namespaces (ours: worker.sh, sshd and what they started), then
        the namespaces, which takes their links with them."""
        for ns in self.namespaces:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for node in self.nodes:
            if node.init is not None:
                try:
                    node.init.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces = []
