"""Where the ranks may run: a hostfile (re-read before every launch) or a discovery script with
Horovod's contract (it prints `host:slots` lines), a bounded ssh probe of every host, and a
blacklist with a cool-down for hosts that fail twice."""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import threading
from typing import Callable, Optional

Hosts = list[tuple[str, int]]


def parse_hostfile(text: str, default_slots: int = 1) -> Hosts:
    """Hostfile lines: `host slots=4`, `host:4` or `host` (then `default_slots`); # comments."""
    hosts = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([^\s:]+)(?::(\d+)|\s+slots\s*=\s*(\d+))?(?:\s+max_slots\s*=\s*\d+)?", line)
        if not m:
            raise ValueError(f"hostfile line {lineno}: cannot read {raw!r} (expected 'host slots=N' or 'host:N')")
        slots = int(m.group(2) or m.group(3) or default_slots)
        hosts.append((m.group(1), slots))
    if not hosts:
        raise ValueError("hostfile names no hosts")
    return hosts


def parse_host_list(spec: str) -> Hosts:
    """horovodrun's `-H a:2,b:2` (a host without slots has 1)."""
    hosts = []
    for item in filter(None, spec.split(",")):
        name, _, slots = item.partition(":")
        hosts.append((name, int(slots or 1)))
    return hosts


def host_list(hosts: Hosts) -> str:
    return ",".join(f"{h}:{s}" for h, s in hosts)


def is_this_machine(host: str) -> bool:
    name = socket.gethostname()
    return host in ("localhost", "127.0.0.1", "::1", name, name.split(".")[0], socket.getfqdn())


def place(hosts: Hosts, world_size: int) -> Hosts:
    """`world_size` ranks on `hosts`, filling each host's slots in order."""
    placed, left = [], world_size
    for name, slots in hosts:
        if left <= 0:
            break
        placed.append((name, min(slots, left)))
        left -= placed[-1][1]
    return placed


def ssh_command(host: str, command: str, timeout: int) -> list[str]:
    port = os.environ.get("DISTFT_SSH_PORT")
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", f"ConnectTimeout={timeout}"]
    return cmd + (["-p", port] if port else []) + [host, command]


def ssh(host: str, command: str, timeout: int = 10) -> subprocess.CompletedProcess:
    cmd = ssh_command(host, command, timeout)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 255, "", f"no answer within {timeout + 5} s")


def unreachable(hosts: list[str], timeout: int = 10) -> list[tuple[str, str]]:
    """Which of `hosts` (this machine never counts) do not answer `ssh host true` within the
    timeout, with ssh's last line, probed in parallel."""
    hosts = [h for h in dict.fromkeys(hosts) if not is_this_machine(h)]
    results: dict[str, subprocess.CompletedProcess] = {}
    probes = [threading.Thread(target=lambda h=h: results.__setitem__(h, ssh(h, "true", timeout)), daemon=True)
              for h in hosts]
    for t in probes:
        t.start()
    for t in probes:
        t.join()
    return [(h, results[h].stderr.strip().splitlines()[-1] if results[h].stderr.strip() else
             f"ssh exited {results[h].returncode}") for h in hosts if results[h].returncode != 0]


class HostSource:
    """The hosts the job may use now: a hostfile (re-read each time), a discovery script, or a
    fixed list (horovodrun's -H)."""

    def __init__(self, hostfile: Optional[str] = None, slots: int = 1, discovery: Optional[str] = None,
                 fixed: Optional[Hosts] = None, timeout: int = 30):
        self.hostfile, self.slots, self.discovery, self.fixed = hostfile, slots, discovery, fixed
        self.timeout = timeout

    def read(self) -> Hosts:
        """The hosts; a ValueError names the file or script that cannot be read."""
        if self.discovery:
            try:
                done = subprocess.run(shlex.split(self.discovery), capture_output=True, text=True,
                                      timeout=self.timeout)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ValueError(f"--host-discovery-script {self.discovery}: {exc}") from None
            if done.returncode != 0:
                raise ValueError(f"--host-discovery-script {self.discovery}: exited {done.returncode}: "
                                 f"{done.stderr.strip()[-300:]}")
            try:
                return parse_hostfile(done.stdout, self.slots)
            except ValueError as exc:
                raise ValueError(f"--host-discovery-script {self.discovery}: {exc}") from None
        if self.hostfile:
            try:
                with open(self.hostfile) as fh:
                    return parse_hostfile(fh.read(), self.slots)
            except (OSError, ValueError) as exc:
                raise ValueError(f"DISTFT_HOSTFILE {self.hostfile}: {exc}") from None
        return list(self.fixed or [])


class Blacklist:
    """A host that fails twice is left out for `cooldown` seconds, then tried again."""

    def __init__(self, cooldown: float, clock: Callable[[], float]):
        self.cooldown, self.clock = cooldown, clock
        self.strikes: dict[str, int] = {}
        self.until: dict[str, float] = {}

    def failed(self, host: str) -> bool:
        """Count a failure of `host`; True when that blacklists it."""
        self.strikes[host] = self.strikes.get(host, 0) + 1
        if self.strikes[host] >= 2:
            self.strikes[host] = 0
            self.until[host] = self.clock() + self.cooldown
            return True
        return False

    def banned(self, host: str) -> bool:
        return self.until.get(host, float("-inf")) > self.clock()
