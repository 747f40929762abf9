"""One launch of horovodrun (or mpirun), in a process group of its own, with its output passed
through and read for what the supervisor needs: the first failing rank's exit code, whether the
ranks got as far as training, the job's global batch and where it resumed.

- horovodrun's Gloo controller turns any rank's failure into its own exit 1 (its MPI controller
  execs mpirun, whose status is already the first failing rank's). The code of the first rank to
  fail (what horovodrun and mpirun report as `Exit code: N`) is read from the output.
- A stop request is NOT a signal to horovodrun: it would SIGTERM its local ranks and SIGKILL them
  5 s later, and ranks on other nodes would never see it. The launch id is written to the stop
  file ($DISTFT_STOP_FILE) on this machine and, over ssh, on the first host of the job. One rank
  seeing it is enough: the stop vote rides in the gradient exchange, every rank checkpoints at
  the same step and exits 75. `kill` signals the whole process group (give up now).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from typing import Iterable, Optional

from distft.launchenv import PEER_LOST, write_stop_file
from distft.supervisor.hosts import is_this_machine, ssh

# horovodrun's RuntimeError (Gloo) and mpirun's report name the first failing process's code;
# lines of the ranks' own output carry horovodrun's `[rank]<stdout>:` prefix and never count
_EXIT = re.compile(r"(?:Exit code:\s+|mpirun failed with exit code )(\d+)")
_RANK_OUTPUT = re.compile(r"^\[\d+(?:,\d+)?\]<std(?:out|err)>:")
# what rank 0 prints once set-up is done (train/job.py), just before the first step
_TRAINING = re.compile(r"\[distft\] .* rank\(s\) \[.*\], (?:global batch (\d+)|lbfgs on all)")
_RESUMED = re.compile(r"\[distft\] resumed at step (\d+)")
_ERROR = re.compile(r"distft: error.*")


def first_failure_code(lines: Iterable[str]) -> Optional[int]:
    code = None
    for line in lines:
        if _RANK_OUTPUT.match(line):
            continue
        m = _EXIT.search(line)
        if m:
            code = int(m.group(1))
    return code


def say(text: str) -> None:
    print(f"[launch] {text}", file=sys.stderr, flush=True)


class Launch:
    """`argv` (horovodrun ... python -m distft ...) run once; `env` is added to ours."""

    def __init__(self, argv: list[str], stop_file: str, launch_id: str, hosts: list[str], env=None):
        self.argv, self.stop_file, self.launch_id, self.hosts = argv, stop_file, launch_id, hosts
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self.started = False
        self.global_batch: Optional[int] = None
        self.resume_step: Optional[int] = None
        self.error = ""
        self.peer_lost = False

    def _pump(self, source, sink) -> None:
        for line in iter(source.readline, ""):
            sink.write(line)
            sink.flush()
            self._read(line)
            self.lines.append(line)
            del self.lines[:-200]  # the failure report is in the last lines

    def _read(self, line: str) -> None:
        m = _TRAINING.search(line)
        if m:
            self.started = True
            self.global_batch = int(m.group(1)) if m.group(1) else None
        m = _RESUMED.search(line)
        if m:
            self.resume_step = int(m.group(1))
        self.peer_lost = self.peer_lost or PEER_LOST in line
        m = _ERROR.search(line)
        if m and not self.error:
            self.error = m.group(0)

    def run(self) -> int:
        """horovodrun's own status (negative: killed by that signal)."""
        # a session of its own: a signal meant for all of it (kill) reaches horovodrun, mpirun,
        # ssh and local ranks, and a Ctrl-C on the terminal reaches only the supervisor
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace", env=self.env, start_new_session=True)
        pumps = [threading.Thread(target=self._pump, args=(self.proc.stdout, sys.stdout), daemon=True),
                 threading.Thread(target=self._pump, args=(self.proc.stderr, sys.stderr), daemon=True)]
        for t in pumps:
            t.start()
        rc = self.proc.wait()
        for t in pumps:
            t.join(timeout=10)
        return rc

    def code(self) -> Optional[int]:
        return first_failure_code(self.lines)

    def request_stop(self) -> None:
        """Reach one rank: this machine's stop file, and the first host's over ssh if it is not
        this machine (an MPIJob launcher runs no rank)."""
        try:
            write_stop_file(self.stop_file, self.launch_id)
        except OSError as exc:
            say(f"cannot write the stop file {self.stop_file}: {exc}")
        if self.hosts and not is_this_machine(self.hosts[0]):
            q = shlex.quote
            remote = (f"printf %s {q(self.launch_id)} > {q(self.stop_file)}.tmp && "
                      f"mv {q(self.stop_file)}.tmp {q(self.stop_file)}")
            done = ssh(self.hosts[0], remote)
            if done.returncode != 0:
                say(f"could not reach {self.hosts[0]} to request the stop: {done.stderr.strip()}")

    def kill(self, signum: int = signal.SIGTERM) -> None:
        """`signum` to the launch's whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass
