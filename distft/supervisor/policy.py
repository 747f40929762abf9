"""What the supervisor does after a launch ends: pure decisions, unit-tested without processes.

Failure classes (the job's exit codes are in the README):
- 0 done; 75 stopped at an agreed checkpoint (a preemption): never restarted, 75 goes to the
  scheduler, which requeues;
- 2 (config, data, checkpoint), 3 (frozen weights differ) and 4 (NaN/Inf): the same input gives
  the same failure, so never restarted;
- a lost node (a host that no longer answers ssh), a stall abort (5: a collective never
  completed), a rank killed or ended by a signal, a rank whose Horovod shut down under it because
  of such a peer (3 with launchenv.PEER_LOST), an ssh failure: restarted, after a backoff.
- A failure before the first step of a launch is restarted once (then it is not a lost rank,
  it is the set-up), and the same failure twice in a row from the same resume point stops.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional

from distft.launchenv import PEER_LOST

DONE, STOPPED, USER_ERROR, STALL = 0, 75, 2, 5
NEVER_RESTARTED = {USER_ERROR: "a config, data or checkpoint error", 3: "frozen weights differ between ranks",
                   4: "NaN/Inf in the loss or gradients", STOPPED: "stopped at an agreed checkpoint"}
# distft.launcher's own code when too few hosts are left (after --wait-hosts)
TOO_FEW_HOSTS = 6

# the bounded set of reasons (a Prometheus label, summary.json's restarts[].reason)
NODE_LOST, STALLED, RANK_LOST, STARTUP = "node_lost", "stall", "rank_lost", "startup"
GROW = "grow"  # not a failure: relaunched on hosts that came back (loop.py)


@dataclass
class Failure:
    """How one launch ended: `code` is the first failing rank's exit code as horovodrun or
    mpirun reports it (None: none reported), `rc` horovodrun's own status."""
    rc: int
    code: Optional[int]
    started: bool  # the ranks got as far as training
    resume_step: Optional[int]  # where this launch resumed (None: unknown or a fresh start)
    lost_hosts: list[str] = field(default_factory=list)
    error: str = ""  # the first `distft: error` line, if any
    peer_lost: bool = False  # a rank saw Horovod shut down under it (launchenv.PEER_LOST)

    @property
    def status(self) -> int:
        """The job's exit status if this is the end."""
        if self.code is not None:
            return self.code
        return 128 - self.rc if self.rc < 0 else self.rc

    @property
    def reason(self) -> str:
        if self.lost_hosts:
            return NODE_LOST
        if not self.started:
            return STARTUP
        if self.code == STALL:
            return STALLED
        return RANK_LOST

    @property
    def transient(self) -> bool:
        """A node gone, or a rank that saw Horovod shut down under it (exit 3, as ranks that
        disagree): a peer was lost, and the one that was may be reported later or not at all."""
        return bool(self.lost_hosts) or self.peer_lost or PEER_LOST in self.error

    def signature(self) -> tuple:
        """What makes two failures "the same": class, code, hosts, error text, resume point."""
        return (self.reason, self.code, tuple(sorted(self.lost_hosts)), re.sub(r"\d+", "#", self.error),
                self.resume_step)


@dataclass
class Verdict:
    restart: bool
    why: str


class RestartPolicy:
    """The restart budget (for the whole job, not per host) and the rules above."""

    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.used = 0
        self.last: Optional[Failure] = None

    def decide(self, failure: Failure) -> Verdict:
        previous, self.last = self.last, failure
        code = failure.code
        if code in NEVER_RESTARTED and not (code == 3 and failure.transient):
            return Verdict(False, f"exit {code}: {NEVER_RESTARTED[code]}, not restarted")
        if self.used >= self.max_restarts:
            return Verdict(False, f"the restart budget is spent ({self.used} of --max-restarts {self.max_restarts})")
        if previous is not None and not failure.started and not previous.started:
            return Verdict(False, "the launch failed before its first step twice in a row: not a lost "
                                  "rank but the set-up; not restarted again")
        if previous is not None and previous.signature() == failure.signature():
            return Verdict(False, f"the same failure ({failure.reason}, exit {failure.status}) twice in a "
                                  "row from the same checkpoint: not restarted again")
        self.used += 1
        return Verdict(True, f"restart {self.used} of {self.max_restarts}")


def backoff_seconds(failures_in_a_row: int, rng: random.Random, cap: float = 60.0, jitter: float = 0.25) -> float:
    """1, 2, 4, ... s after the 1st, 2nd, 3rd failure without progress, capped at `cap`, plus up to
    `jitter` of it at random (relaunches of many jobs do not line up)."""
    base = min(cap, 2.0 ** max(failures_in_a_row - 1, 0))
    return base * (1 + jitter * rng.random())


def world_size(slots: int, global_batch: Optional[int], min_np: int, max_np: Optional[int]) -> int:
    """The largest world size at most `slots` (and `max_np`) that divides the job's global batch
    (any size when it is not known yet), or 0 when there is none of at least `min_np`."""
    top = min(slots, max_np) if max_np else slots
    for w in range(top, max(min_np, 1) - 1, -1):
        if global_batch is None or global_batch % w == 0:
            return w
    return 0
