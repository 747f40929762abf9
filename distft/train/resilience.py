"""Preemption and hangs.

- A stop request on any rank (SIGTERM; Ctrl-C, i.e. SIGINT, which is a preemption too; the stop
  file of launcher.py, read at every step; a test's fault hook) travels in the next step's
  ballot; every rank stops at the same step, checkpoints and exits 75. A second Ctrl-C quits at
  once, without a checkpoint (the last completed one is intact).
- The preemption deadline (`train.preempt_grace`) is for a peer that is gone: it counts only
  while the stop is not yet agreed and the ranks are not in a phase they entered together
  (validation, the agreed checkpoint). Once every rank has agreed to stop it is disarmed, so no
  healthy rank is killed while the checkpoint is written.
- The watchdog exits a rank that made no progress for `train.stall_timeout` seconds.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from distft import faults
from distft.launchenv import LAUNCH_ID_ENV, STOP_FILE_ENV, stop_file_says_stop


class Resilience:
    def __init__(self, world, stall_timeout: float, preempt_grace: float):
        self.world = world
        self.stall_timeout, self.preempt_grace = stall_timeout, preempt_grace
        self.heartbeat = time.monotonic()
        self.stop_requested = False
        self.stop_reason = "SIGTERM"  # what asked for the stop, for the message at the end
        self.finished = False
        self._together = 0  # depth of phases all ranks are in together
        self._agreed = False
        # under launch/launch.sh: SIGTERM to the launcher reaches the ranks as this file
        self.stop_file = os.environ.get(STOP_FILE_ENV)
        self.launch_id = os.environ.get(LAUNCH_ID_ENV)

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    @contextmanager
    def together(self):
        """A phase every rank enters at the same point (validation, a checkpoint): waiting for
        a peer there is not a sign that it is gone."""
        self._together += 1
        self.beat()
        try:
            yield
        finally:
            self._together -= 1
            self.beat()

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: self.request_stop())
            signal.signal(signal.SIGINT, self._on_sigint)
        self.beat()
        if self.stall_timeout:
            threading.Thread(target=self._watch, name="distft-watchdog", daemon=True).start()

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # the second Ctrl-C: the user will not wait
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.stop_reason = "Ctrl-C"
        if self.world.rank == 0:
            print("\n[distft] Ctrl-C: stopping at the next step with a checkpoint (Ctrl-C again quits now, "
                  "without one)", file=sys.stderr, flush=True)
        self.request_stop()

    def request_stop(self) -> None:
        if self.stop_requested:
            return
        self.stop_requested = True
        threading.Thread(target=self._deadline, name="distft-preempt-deadline", daemon=True).start()

    def poll(self, step: int) -> None:
        """Stop requests that are not signals: the launcher's stop file, a test's fault hook."""
        if faults.stop_requested(self.world.rank, step) or \
                (self.stop_file and stop_file_says_stop(self.stop_file, self.launch_id)):
            self.request_stop()

    def stop_agreed(self) -> None:
        self._agreed = True

    def _deadline(self) -> None:
        waited, tick = 0.0, 0.1
        while not (self._agreed or self.finished):
            time.sleep(tick)
            if not self._together:
                waited += tick
            if waited > self.preempt_grace:
                print(f"distft: error (rank {self.world.rank}): {self.stop_reason} {self.preempt_grace:g} s ago and no clean "
                      "stop (train.preempt_grace): a peer rank is gone; exiting, the last completed checkpoint "
                      "is intact", file=sys.stderr, flush=True)
                os._exit(143)

    def _watch(self) -> None:
        timeout = self.stall_timeout
        while not self.finished:
            time.sleep(min(1.0, timeout / 4))
            idle = time.monotonic() - self.heartbeat
            if idle > timeout and not self.finished:
                print(f"distft: error (rank {self.world.rank}): no progress for {idle:.0f} s "
                      f"(train.stall_timeout {timeout:g} s): a rank is hung or a collective never "
                      f"completed; Horovod's stall report above names the missing ranks",
                      file=sys.stderr, flush=True)
                os._exit(5)
