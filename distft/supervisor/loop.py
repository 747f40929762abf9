"""The supervisor: launch, and after a failure relaunch from the last checkpoint on the hosts
that are left, within a restart budget for the whole job (`distft.launcher` parses its options).

Each launch is `RUNNER -np W -H hosts RUNNER_ARGS JOB...`. Before each launch (when any elastic
option is set) the hosts are read again, probed over ssh within a bound, blacklisted ones left
out, and the world size chosen: the largest that fits and divides the job's global batch (which
the job keeps across world sizes by accumulation), or, below --min-np, wait up to --wait-hosts
and give up naming the missing hosts. A relaunched job is told why and where (DISTFT_RESTART):
it records that in log.jsonl (summary.json `restarts`) and in Prometheus.
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

from distft.launchenv import LAUNCH_ID_ENV, RESTART_ENV, encode_restart
from distft.supervisor.hosts import Blacklist, Hosts, HostSource, host_list, is_this_machine, place, unreachable
from distft.supervisor.launch import Launch, say
from distft.supervisor.policy import GROW, STOPPED, TOO_FEW_HOSTS, USER_ERROR, Failure, RestartPolicy, backoff_seconds, \
    world_size


@dataclass
class Options:
    max_restarts: int = 0
    min_np: int = 1
    max_np: Optional[int] = None
    wait_hosts: float = 300.0
    blacklist_cooldown: float = 600.0
    probe_timeout: int = 5
    seed: Optional[int] = None
    grow_every: float = 60.0  # how often a job below the hosts' capacity looks for returned hosts (0: never)

    def elastic(self, source: HostSource) -> bool:
        """Any option beyond today's single launch (without one, nothing is probed or resized)."""
        return bool(self.max_restarts or self.min_np > 1 or self.max_np or source.discovery)


def without_option(args: list[str], name: str) -> list[str]:
    """`args` less `name VALUE`: horovodrun refuses --network-interface when every host is this
    machine (it then looks for an interface holding 127.0.0.1), e.g. after a relaunch on the
    last node left."""
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word == name:
            skip = True
        elif not word.startswith(name + "="):
            out.append(word)
    return out


class Supervisor:
    def __init__(self, runner: list[str], runner_args: list[str], job: list[str], source: HostSource,
                 options: Options, stop_file: str, launch_id: str,
                 clock: Callable[[], float] = time.monotonic):
        self.runner, self.runner_args, self.job = runner, runner_args, job
        self.source, self.options = source, options
        self.stop_file, self.launch_id = stop_file, launch_id
        self.clock = clock
        self.policy = RestartPolicy(options.max_restarts)
        self.blacklist = Blacklist(options.blacklist_cooldown, clock)
        self.rng = random.Random(options.seed)
        self.stops = 0
        self.current: Optional[Launch] = None
        self.global_batch: Optional[int] = None
        self.counts: dict[str, int] = {}
        self.lost_at: dict[str, tuple[float, str]] = {}  # hosts found unreachable after a failure
        self.launches = 0
        self.first_launch_at = 0.0  # wall time of this job's first launch
        self.growing = False  # a stop requested to relaunch on more hosts

    # --- signals ----------------------------------------------------------------------------------
    def on_stop(self, signum, frame) -> None:
        """SIGTERM or SIGINT: the first is a stop request (checkpoint, 75), the second ends the
        launch now."""
        self.stops += 1
        name = signal.Signals(signum).name
        launch = self.current
        if self.stops == 1:
            say(f"{name}: stop requested ({self.stop_file}); the ranks checkpoint at the next step "
                f"and exit 75 (a second {name} ends horovodrun at once)")
            if launch is not None:
                threading.Thread(target=launch.request_stop, daemon=True).start()
        elif launch is not None:
            say(f"second {name}: passing SIGTERM to horovodrun and everything it started")
            launch.kill(signal.SIGTERM)

    def _wait(self, seconds: float) -> bool:
        """Sleep, unless a stop request comes: False then."""
        end = self.clock() + seconds
        while self.clock() < end:
            if self.stops:
                return False
            time.sleep(min(0.2, max(end - self.clock(), 0)))
        return not self.stops

    # --- hosts --------------------------------------------------------------------------------------
    def hosts_for_launch(self) -> Union[Hosts, int]:
        """The hosts of the next launch, or the exit status when there are none to be had."""
        opts = self.options
        deadline = self.clock() + opts.wait_hosts
        while True:
            try:
                listed = self.source.read()
            except ValueError as exc:
                say(str(exc))
                return USER_ERROR
            if not opts.elastic(self.source):
                return listed
            why: dict[str, str] = {h: "blacklisted after failing twice (cool-down)" for h, _ in listed
                                   if self.blacklist.banned(h)}
            names = {h for h, _ in listed}
            for host, (when, error) in self.lost_at.items():  # just probed: not again before the relaunch
                if host in names and host not in why and self.clock() - when < 3 * opts.probe_timeout:
                    why[host] = f"unreachable (ssh: {error})"
            # a probe that fails here is no strike: while waiting for hosts, the host waited for
            # would be banned before it could come back (strikes are counted per failed launch)
            for host, error in unreachable([h for h, _ in listed if h not in why], opts.probe_timeout):
                why[host] = f"unreachable (ssh: {error})"
            alive = [(h, s) for h, s in listed if h not in why]
            slots = sum(s for _, s in alive)
            size = world_size(slots, self.global_batch, opts.min_np, opts.max_np)
            if size:
                if size < min(slots, opts.max_np or slots):
                    say(f"{slots} slots are left, but the job's global batch of {self.global_batch} samples "
                        f"needs a world size that divides it: {size} ranks")
                return place(alive, size)
            missing = "; ".join(f"{h} {w}" for h, w in why.items()) or "none unreachable"
            if self.clock() >= deadline:
                say(f"too few hosts: {slots} slot(s) on {host_list(alive) or 'no host'}, --min-np {opts.min_np}"
                    f"{'' if self.global_batch is None else f' (global batch {self.global_batch})'}, after "
                    f"waiting {opts.wait_hosts:g} s (--wait-hosts); missing: {missing}")
                return TOO_FEW_HOSTS
            if not self._wait(min(5.0, max(deadline - self.clock(), 0.0))):
                return STOPPED

    # --- the loop -----------------------------------------------------------------------------------
    def command(self, hosts: Hosts) -> list[str]:
        args = self.runner_args
        if all(is_this_machine(h) for h, _ in hosts):
            args = without_option(args, "--network-interface")
        return self.runner + ["-np", str(sum(s for _, s in hosts)), "-H", host_list(hosts)] + args + self.job

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        pending: Optional[dict] = None  # the relaunch to come: its number, reason and the counts
        while True:
            hosts = self.hosts_for_launch()
            if isinstance(hosts, int):
                return hosts
            if self.stops:
                say("stopped before the launch; the last completed checkpoint is intact")
                return STOPPED
            env = None
            if not self.launches:
                self.first_launch_at = time.time()
            if pending:
                # since: a job with train.resume: false resumes a relaunch from its own checkpoints
                record = {**pending, "hosts": host_list(hosts), "world_size": sum(s for _, s in hosts),
                          "since": self.first_launch_at}
                of = "" if record["reason"] == GROW else f" of {self.options.max_restarts}"
                say(f"relaunch {record['n']}{of} ({record['reason']}): hosts "
                    f"{record['hosts']}, world size {record['world_size']}, from the last checkpoint")
                env = {RESTART_ENV: encode_restart(record)}
            cmd = self.command(hosts)
            say(" ".join(cmd[:len(self.runner) + 4 + len(self.runner_args)]))
            # each launch its own id: a stop file left by the previous one does not stop this one
            launch_id = self.launch_id if not self.launches else f"{self.launch_id}.{self.launches}"
            self.launches += 1
            self.current = Launch(cmd, self.stop_file, launch_id, [h for h, _ in hosts],
                                  {**(env or {}), LAUNCH_ID_ENV: launch_id})
            if self.options.max_restarts and self.options.grow_every:
                threading.Thread(target=self._watch_for_hosts, args=(self.current, hosts), daemon=True).start()
            rc = self.current.run()
            launch, self.current = self.current, None
            grew, self.growing = self.growing, False
            self.global_batch = launch.global_batch or self.global_batch
            if rc == 0:
                return 0
            if rc < 0 and launch.code() is None:
                return 128 - rc  # horovodrun itself was killed by a signal
            failure = self.failure(launch, rc, hosts)
            if self.stops or not self.options.max_restarts:
                return failure.status
            if grew and failure.code == STOPPED:  # stopped at an agreed checkpoint to grow
                self.counts[GROW] = self.counts.get(GROW, 0) + 1
                pending = {"n": self.launches, "reason": GROW, "counts": dict(self.counts)}
                continue
            verdict = self.policy.decide(failure)
            if not verdict.restart:
                say(f"not restarted: {verdict.why}")
                return failure.status
            delay = backoff_seconds(self.policy.used, self.rng)
            lost = f" ({', '.join(failure.lost_hosts)} unreachable)" if failure.lost_hosts else ""
            say(f"{verdict.why} in {delay:.1f} s: {failure.reason}{lost}, exit {failure.status}")
            if not self._wait(delay):
                say("stopped before the relaunch; the last completed checkpoint is intact")
                return STOPPED
            self.counts[failure.reason] = self.counts.get(failure.reason, 0) + 1
            pending = {"n": self.policy.used, "reason": failure.reason, "counts": dict(self.counts)}

    def _watch_for_hosts(self, launch: Launch, hosts: Hosts) -> None:
        """While `launch` runs below what the hosts could hold, look every --grow-every seconds
        for hosts that came back; when a bigger world fits (and divides the global batch), ask
        the ranks to stop at an agreed checkpoint: the loop relaunches on them (not a failure,
        not counted against the budget)."""
        opts, running = self.options, {h for h, _ in hosts}
        size = sum(s for _, s in hosts)
        while not self._launch_ended(launch, opts.grow_every):
            if not launch.started or self.stops or self.growing:
                continue
            try:
                listed = [(h, s) for h, s in self.source.read() if not self.blacklist.banned(h)]
            except ValueError:
                continue
            lost = {h for h, _ in unreachable([h for h, _ in listed if h not in running], opts.probe_timeout)}
            alive = [(h, s) for h, s in listed if h not in lost]
            bigger = world_size(sum(s for _, s in alive), launch.global_batch, opts.min_np, opts.max_np)
            if bigger > size and not self._launch_ended(launch, 0):
                self.growing = True
                say(f"hosts came back: {host_list(alive)}; the ranks stop at the next step with a checkpoint "
                    f"and the job is relaunched on {bigger} ranks")
                launch.request_stop()
                return

    @staticmethod
    def _launch_ended(launch: Launch, wait: float) -> bool:
        time.sleep(wait)
        return launch.proc is not None and launch.proc.poll() is not None

    def failure(self, launch: Launch, rc: int, hosts: Hosts) -> Failure:
        code = launch.code()
        lost = unreachable([h for h, _ in hosts if not is_this_machine(h)], self.options.probe_timeout)
        for host, why in lost:
            self.lost_at[host] = (self.clock(), why)
            say(f"{host} is unreachable (ssh: {why}): the node or its network is gone; its ranks cannot take "
                "part, so the others stopped; the last completed checkpoint is intact")
            if self.blacklist.failed(host):
                say(f"{host} failed twice: left out for {self.options.blacklist_cooldown:g} s")
        if code is None:
            say(f"horovodrun exited {rc} before any rank reported a code")
        else:
            say(f"the job's exit status: {code} (the first rank to end; horovodrun itself exits {rc})")
        return Failure(rc, code, launch.started, launch.resume_step, [h for h, _ in lost], launch.error, launch.peer_lost)
