"""Run horovodrun so that a stop request and the job's exit status pass through it.

    python -m distft.launcher horovodrun -np 4 -H node1:2,node2:2 --gloo python -m distft ...

(launch/launch.sh runs it; standard library only, and distft's own `launchenv`, the protocol it
shares with the ranks.)

- horovodrun's Gloo controller turns any rank's failure into its own exit 1 (its MPI
  controller execs mpirun, whose status is already the first failing rank's). Here the code of
  the first rank to fail (what horovodrun and mpirun report as `Exit code: N`) becomes this
  process's exit status either way: 75 when the ranks stopped resumable, 2 for a user error.
- SIGTERM here (a pod eviction of the launcher, Slurm's `--signal=B:TERM@...`) is NOT passed to
  horovodrun: it would SIGTERM its local ranks and SIGKILL them 5 s later, and ranks on other
  nodes would never see it. Instead the launch id is written to the stop file
  ($DISTFT_STOP_FILE) on this machine and, over ssh, on the first host of the job. One rank
  seeing it is enough: the stop vote rides in the gradient exchange, every rank checkpoints at
  the same step and exits 75. A second SIGTERM is passed to horovodrun (give up now).
- After a failure, every other host of the job is asked over ssh whether it still answers; a
  host that does not is named (a partitioned node shows up to its peers only as a stall).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import uuid
from typing import Iterable, Optional

from distft.launchenv import DEFAULT_STOP_FILE, LAUNCH_ID_ENV, STOP_FILE_ENV, write_stop_file

# horovodrun's RuntimeError (Gloo) and mpirun's report name the first failing process's code;
# lines of the ranks' own output carry horovodrun's `[rank]<stdout>:` prefix and never count
_EXIT = re.compile(r"(?:Exit code:\s+|mpirun failed with exit code )(\d+)")
_RANK_OUTPUT = re.compile(r"^\[\d+(?:,\d+)?\]<std(?:out|err)>:")


def first_failure_code(lines: Iterable[str]) -> Optional[int]:
    code = None
    for line in lines:
        if _RANK_OUTPUT.match(line):
            continue
        m = _EXIT.search(line)
        if m:
            code = int(m.group(1))
    return code


def job_hosts(argv: list[str]) -> list[str]:
    """Host names of horovodrun's `-H a:2,b:2` (none: this machine)."""
    for flag in ("-H", "--hosts"):
        if flag in argv[:-1]:
            return [h.rsplit(":", 1)[0] for h in argv[argv.index(flag) + 1].split(",") if h]
    return []


def is_this_machine(host: str) -> bool:
    name = socket.gethostname()
    return host in ("localhost", "127.0.0.1", "::1", name, name.split(".")[0], socket.getfqdn())


class Launcher:
    def __init__(self, argv: list[str]):
        self.argv = argv
        self.stop_file = os.environ.setdefault(STOP_FILE_ENV, DEFAULT_STOP_FILE)
        self.launch_id = os.environ.setdefault(LAUNCH_ID_ENV, uuid.uuid4().hex)
        self.lines: list[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self.stops = 0

    def say(self, text: str) -> None:
        print(f"[launch] {text}", file=sys.stderr, flush=True)

    def request_stop(self) -> None:
        """Reach one rank: this machine's stop file, and the first host's over ssh if it is not
        this machine (an MPIJob launcher runs no rank)."""
        try:
            write_stop_file(self.stop_file, self.launch_id)
        except OSError as exc:
            self.say(f"cannot write the stop file {self.stop_file}: {exc}")
        hosts = job_hosts(self.argv)
        if hosts and not is_this_machine(hosts[0]):
            remote = (f"printf %s {shlex.quote(self.launch_id)} > {shlex.quote(self.stop_file)}.tmp && "
                      f"mv {shlex.quote(self.stop_file)}.tmp {shlex.quote(self.stop_file)}")
            done = self.ssh(hosts[0], remote)
            if done.returncode != 0:
                self.say(f"could not reach {hosts[0]} to request the stop: {done.stderr.strip()}")

    def ssh(self, host: str, command: str, timeout: int = 10) -> subprocess.CompletedProcess:
        port = os.environ.get("DISTFT_SSH_PORT")
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", f"ConnectTimeout={timeout}"]
        cmd += ["-p", port] if port else []
        try:
            return subprocess.run(cmd + [host, command], capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 255, "", f"no answer within {timeout + 5} s")

    def unreachable_hosts(self) -> list[tuple[str, str]]:
        """After a failure: which of the job's other hosts no longer answer ssh (a node or its
        network gone: its ranks' peers only see a stalled collective)."""
        hosts = [h for h in dict.fromkeys(job_hosts(self.argv)) if not is_this_machine(h)]
        results: dict[str, subprocess.CompletedProcess] = {}
        probes = [threading.Thread(target=lambda h=h: results.__setitem__(h, self.ssh(h, "true")), daemon=True)
                  for h in hosts]
        for t in probes:
            t.start()
        for t in probes:
            t.join()
        return [(h, results[h].stderr.strip().splitlines()[-1] if results[h].stderr.strip() else
                 f"ssh exited {results[h].returncode}") for h in hosts if results[h].returncode != 0]

    def on_sigterm(self, signum, frame) -> None:
        self.stops += 1
        if self.stops == 1:
            self.say(f"SIGTERM: stop requested ({self.stop_file}); the ranks checkpoint at the next step "
                     "and exit 75 (a second SIGTERM ends horovodrun at once)")
            threading.Thread(target=self.request_stop, daemon=True).start()
        elif self.proc is not None:
            self.say("second SIGTERM: passing it to horovodrun")
            self.proc.send_signal(signal.SIGTERM)

    def on_sigint(self, signum, frame) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)

    def _pump(self, source, sink) -> None:
        for line in iter(source.readline, ""):
            sink.write(line)
            sink.flush()
            self.lines.append(line)
            del self.lines[:-200]  # the failure report is in the last lines

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_sigterm)
        signal.signal(signal.SIGINT, self.on_sigint)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace")
        pumps = [threading.Thread(target=self._pump, args=(self.proc.stdout, sys.stdout), daemon=True),
                 threading.Thread(target=self._pump, args=(self.proc.stderr, sys.stderr), daemon=True)]
        for t in pumps:
            t.start()
        rc = self.proc.wait()
        for t in pumps:
            t.join(timeout=10)
        if rc == 0:
            return 0
        if rc < 0:
            return 128 - rc  # horovodrun itself was killed by a signal
        code = first_failure_code(self.lines)
        for host, why in self.unreachable_hosts():
            self.say(f"{host} is unreachable (ssh: {why}): the node or its network is gone; its ranks "
                     "cannot take part, so the others stopped; the last completed checkpoint is intact")
        if code is None:
            self.say(f"horovodrun exited {rc} before any rank reported a code")
            return rc
        self.say(f"the job's exit status: {code} (the first rank to end; horovodrun itself exits {rc})")
        return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m distft.launcher horovodrun ARGS...", file=sys.stderr)
        return 2
    return Launcher(argv).run()


if __name__ == "__main__":
    sys.exit(main())
