"""The supervisor's command line: what launch/launch.sh runs.

    python -m distft.launcher [--hostfile F [--slots N]] horovodrun [-np N -H a:2,b:2] --gloo \\
        python -m distft --config job.yaml [--max-restarts 3 --min-np 2 --max-np 8 \\
        --host-discovery-script S --wait-hosts SECONDS]

The supervisor's own options may stand anywhere after the runner (launch.sh passes the user's
arguments through); each has an environment equivalent (DISTFT_MAX_RESTARTS, DISTFT_MIN_NP,
DISTFT_MAX_NP, DISTFT_HOST_DISCOVERY_SCRIPT, DISTFT_WAIT_HOSTS; DISTFT_BLACKLIST_COOLDOWN,
DISTFT_RESTART_SEED, DISTFT_PROBE_TIMEOUT, DISTFT_GROW_EVERY). With none of them (`--max-restarts 0`) it launches once, as plain
horovodrun would, and only passes the stop request and the exit status through. What it does
is in distft/supervisor/; standard library only (an import-linter contract).
"""
from __future__ import annotations

import os
import sys
import uuid
from typing import Optional

from distft.launchenv import DEFAULT_STOP_FILE, LAUNCH_ID_ENV, STOP_FILE_ENV
from distft.supervisor.hosts import HostSource, parse_host_list, place
from distft.supervisor.loop import Options, Supervisor

# option: (environment variable, type, Options field)
OPTIONS = {
    "--max-restarts": ("DISTFT_MAX_RESTARTS", int, "max_restarts"),
    "--min-np": ("DISTFT_MIN_NP", int, "min_np"),
    "--max-np": ("DISTFT_MAX_NP", int, "max_np"),
    "--wait-hosts": ("DISTFT_WAIT_HOSTS", float, "wait_hosts"),
    "--host-discovery-script": ("DISTFT_HOST_DISCOVERY_SCRIPT", str, None),
    "--blacklist-cooldown": ("DISTFT_BLACKLIST_COOLDOWN", float, "blacklist_cooldown"),
    "--restart-seed": ("DISTFT_RESTART_SEED", int, "seed"),
    "--probe-timeout": ("DISTFT_PROBE_TIMEOUT", int, "probe_timeout"),
    "--grow-every": ("DISTFT_GROW_EVERY", float, "grow_every"),
}


def take_options(argv: list[str], names, env=os.environ) -> tuple[dict, list[str]]:
    """The values of `names` (`--name V` or `--name=V`, anywhere in argv; else their environment
    variable), and argv without them. A ValueError names the option."""
    found, rest, i = {}, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in names:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            found[name] = value
        else:
            rest.append(argv[i])
        i += 1
    for name in names:
        variable = OPTIONS[name][0] if name in OPTIONS else None
        if name not in found and variable and env.get(variable):
            found[name] = env[variable]
    typed = {}
    for name, value in found.items():
        kind = OPTIONS[name][1] if name in OPTIONS else str
        try:
            typed[name] = kind(value)
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not {'a whole number' if kind is int else 'a number'}") from None
    return typed, rest


def split_command(argv: list[str]) -> tuple[list[str], list[str], list[str], Optional[int], Optional[str]]:
    """horovodrun's argv -> (runner, its other args, the job, -np, -H): the job starts at the
    first word that names a Python interpreter."""
    runner, tail = argv[:1], argv[1:]
    at = next((i for i, word in enumerate(tail) if os.path.basename(word).startswith("python")), len(tail))
    args, job = tail[:at], tail[at:]
    taken, args = take_options(args, ("-np", "-H", "--hosts", "--num-proc"), env={})
    np_ = taken.get("-np") or taken.get("--num-proc")
    return runner, args, job, int(np_) if np_ else None, taken.get("-H") or taken.get("--hosts")


def build(argv: list[str], env=os.environ) -> Supervisor:
    own, argv = take_options(argv, ("--hostfile", "--slots"), env={})
    # the supervisor's options stand among the job's arguments (launch.sh passes them through)
    opts, argv = take_options(argv, tuple(OPTIONS), env)
    if not argv:
        raise ValueError("no command to run (horovodrun ...)")
    runner, runner_args, job, np_, spec = split_command(argv)
    fixed = parse_host_list(spec) if spec else [("localhost", np_ or 1)]
    if np_ and np_ < sum(s for _, s in fixed):
        fixed = place(fixed, np_)  # horovodrun takes the first -np slots
    source = HostSource(hostfile=own.get("--hostfile"), slots=int(own.get("--slots", 1)),
                        discovery=opts.get("--host-discovery-script"), fixed=fixed)
    options = Options(**{OPTIONS[k][2]: v for k, v in opts.items() if OPTIONS[k][2]})
    if options.max_np and options.max_np < options.min_np:
        raise ValueError(f"--max-np {options.max_np} is below --min-np {options.min_np}")
    stop_file = env.setdefault(STOP_FILE_ENV, DEFAULT_STOP_FILE)
    launch_id = env.setdefault(LAUNCH_ID_ENV, uuid.uuid4().hex)
    return Supervisor(runner, runner_args, job, source, options, stop_file, launch_id)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        supervisor = build(argv)
    except ValueError as exc:
        print(f"[launch] {exc}\nusage: python -m distft.launcher [--hostfile F [--slots N]] horovodrun ARGS... "
              "python -m distft ARGS... [--max-restarts N --min-np N --max-np N --host-discovery-script S "
              "--wait-hosts SECONDS]", file=sys.stderr)
        return 2
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
