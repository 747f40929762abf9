"""A real Slurm for the tests: one munged, a slurmctld and one slurmd per node, with a
slurm.conf written for the test.

Where the daemons run is a `Place`: this machine (the single-node Slurm), or a node of the
namespace cluster (tests/support/cluster.py), whose own hostname and address become its `NodeName`
and `NodeAddr`. munged runs once, on this machine: its socket is a file, which every
namespace node sees (they share the root filesystem), so the nodes share one munge key as a
real cluster does. Client commands (sbatch, scontrol, ...) run where the controller runs.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Place:
    """Where a daemon runs: `name` its hostname, `address` its NodeAddr (None: resolve the
    name), `enter` turns a command into one run there, `spool` a directory only it writes."""
    name: str
    address: Optional[str]
    enter: Callable[[list], list]
    spool: str


def here(spool: str) -> Place:
    return Place(socket.gethostname(), None, lambda command: command, spool)


def hardware() -> str:
    """This machine's CPUs and memory as slurmd sees them (`slurmd -C`), without its name."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return re.sub(r"^NodeName=\S+\s*", "", line)


# `ip netns exec` mounts a fresh /sys, without cgroups; slurmd refuses to start without a cgroup
# filesystem, even with proctrack/linuxproc, so a namespace node mounts the one it looks for
CGROUPS = ("{ mountpoint -q /sys/fs/cgroup || { mount -t tmpfs cgroup /sys/fs/cgroup && "
           "mkdir /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd; }; }")


class Slurm:
    """`start()` runs munged, slurmctld on `places[0]` and a slurmd on every place, and waits
    until every node is idle; `close()` ends them. `env` is the client environment."""

    def __init__(self, workdir: str, places: list[Place], kill_wait: int = 30):
        self.dir, self.places, self.kill_wait = workdir, places, kill_wait
        self.conf = os.path.join(workdir, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.daemons: list[subprocess.Popen] = []
        self.munge_pid_file = os.path.join(workdir, "munge", "pid")

    def start(self) -> "Slurm":
        d = self.dir
        for sub in ("state", "munge"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        sock = self._munged()
        ctl = self.places[0]
        nodes = "".join(f"NodeName={p.name}" + (f" NodeAddr={p.address}" if p.address else "") +
                        f" {hardware()} State=UNKNOWN\n" for p in self.places)
        # SlurmdSpoolDir and SlurmdPidFile: the same path means each node's own directory on the
        # namespace cluster (its RUN_DIR), so it comes from the places (one value for all)
        (spool,) = {p.spool for p in self.places}
        with open(self.conf, "w") as fh:
            fh.write(f"""ClusterName=distfttest
SlurmctldHost={ctl.name}{f"({ctl.address})" if ctl.address else ""}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={spool}/slurmd
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={spool}/slurmd.pid
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait={self.kill_wait}
# a requeued job may start again after cred_expire; backfill (every bf_interval s) starts it
SchedulerParameters=bf_interval=2
JobAcctGatherType=jobacct_gather/none
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # PMIx (srun --mpi=pmix) makes a directory per step under /tmp by default: the namespace
        # nodes share /tmp, so each node gets its own
        with open(os.path.join(d, "mpi.conf"), "w") as fh:
            fh.write(f"PMIxCliTmpDirBase={spool}/pmix\n")
        self._daemon(ctl, ["slurmctld", "-D", "-c", "-i"], "slurmctld")
        for place in self.places:
            self._daemon(place, ["sh", "-c", f"mkdir -p {spool}/slurmd {spool}/pmix && {CGROUPS} && exec slurmd -D"],
                         f"slurmd-{place.name}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.client(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
            if len(states) == len(self.places) and set(states) == {"idle"}:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurm nodes never became idle: {states}\n" + self.log("slurmctld.log"))

    def _munged(self) -> str:
        m = os.path.join(self.dir, "munge")
        key, sock = os.path.join(m, "munge.key"), os.path.join(m, "munge.socket")
        subprocess.run(["mungekey", "--create", "--keyfile", key], check=True)
        os.chmod(key, 0o600)
        subprocess.run(["munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--pid-file={self.munge_pid_file}",
                        f"--log-file={m}/log", f"--seed-file={m}/seed"], check=True)
        return sock

    def _daemon(self, place: Place, command: list, name: str) -> None:
        log = open(os.path.join(self.dir, f"{name}.out"), "w")
        self.daemons.append(subprocess.Popen(place.enter(command), env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def client(self, command: list, cwd: str = "/", env: Optional[dict] = None, **kw) -> subprocess.CompletedProcess:
        """A Slurm command (sbatch, scontrol, ...), run in `cwd` where slurmctld runs (entering a
        node's mount namespace leaves the working directory at /)."""
        return subprocess.run(self.places[0].enter(["env", "-C", cwd] + command), env={**self.env, **(env or {})},
                              capture_output=True, text=True, **kw)

    def job(self, job_id: str) -> dict:
        """`scontrol show job`'s fields (JobState, ExitCode, Restarts, ...)."""
        text = self.client(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def log(self, name: str) -> str:
        try:
            return open(os.path.join(self.dir, name)).read()[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        for proc in reversed(self.daemons):
            # on a namespace node the daemon is nsenter's child: the node's teardown ends it;
            # here, SIGTERM ends it
            proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            os.kill(int(open(self.munge_pid_file).read()), 15)
        except (OSError, ValueError):
            pass
