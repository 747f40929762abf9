#!/usr/bin/env python3
"""Turn a hostfile or a Slurm allocation into horovodrun's `-np N -H host:slots,...`.

    python launch/hosts.py --hostfile /etc/mpi/hostfile      # MPI Operator / Open MPI hostfile
    python launch/hosts.py --slurm                           # SLURM_JOB_NODELIST + SLURM_TASKS_PER_NODE

Hostfile lines: `host slots=4`, `host:4` or `host` (then --slots, default 1); # comments.
Slurm node lists: `gpu[01-03,07],cpu5`, several bracket groups (`r[1-2]-n[1-3]`), zero padding kept.
Standard library only: it runs before any virtualenv exists.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

# the hostfile reader is the supervisor's (distft/supervisor/hosts.py: standard library only)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distft.supervisor.hosts import parse_hostfile  # noqa: E402


def _expand_ranges(body: str) -> list[str]:
    out = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(part)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order."""
    names, depth, current = [], 0, ""
    for ch in nodelist:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += ch
    if current:
        names.append(current)
    hosts = []
    for name in names:
        m = re.search(r"\[([^\]]+)\]", name)
        if not m:
            hosts.append(name)
            continue
        for value in _expand_ranges(m.group(1)):
            hosts += expand_nodelist(name[:m.start()] + value + name[m.end():])
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE, e.g. `4(x2),2` -> [4, 4, 2]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE: cannot read {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def from_slurm(env: dict) -> list[tuple[str, int]]:
    nodes = expand_nodelist(env["SLURM_JOB_NODELIST"])
    counts = expand_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ",".join("1" for _ in nodes)))
    if len(counts) != len(nodes):
        raise ValueError(f"{len(nodes)} nodes but SLURM_TASKS_PER_NODE gives {len(counts)} counts")
    return list(zip(nodes, counts))


def horovodrun_args(hosts: list[tuple[str, int]]) -> str:
    return f"-np {sum(s for _, s in hosts)} -H " + ",".join(f"{h}:{s}" for h, s in hosts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hostfile")
    src.add_argument("--slurm", action="store_true")
    p.add_argument("--slots", type=int, default=1, help="slots for hostfile lines that name none")
    args = p.parse_args(argv)
    try:
        if args.slurm:
            hosts = from_slurm(dict(os.environ))
        else:
            with open(args.hostfile) as fh:
                hosts = parse_hostfile(fh.read(), args.slots)
    except (OSError, KeyError, ValueError) as exc:
        print(f"hosts.py: {exc}", file=sys.stderr)
        return 2
    print(horovodrun_args(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
