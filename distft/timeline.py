"""Horovod's timeline (HOROVOD_TIMELINE, written by rank 0) summarised per training step, for
`distft bench`: how long a step's collectives took to move their bytes, and how long they
waited before they could start.

For each collective Horovod records two spans, from the coordinator's point of view:
- NEGOTIATE_*: from the first rank queueing the tensor until every rank has queued it (and
  Horovod's background thread has got round to it: it runs one collective at a time). For a
  synchronized BatchNorm this is the lag of the slower rank at that layer;
- the operation itself (ALLREDUCE, ALLGATHER, ...): the transfer, every rank ready.

Collectives are grouped by distft's names: `distft.syncbn.<layer>.stats` (a synchronized BN's
forward), `.grad` (its backward), `distft.grad.<bucket>` (the gradient exchange) and the rest.
A step is the time between two allreduces of gradient bucket 0 (one per step); the first
`skip` steps (graph building, the response cache filling) are left out.
"""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict

GROUPS = ("bn_forward", "bn_backward", "gradients", "other")


def load(path: str) -> list:
    """The timeline's events. Horovod writes a JSON array it closes only at shutdown; a file
    cut short (a rank killed) still reads up to its last whole event."""
    with open(path) as fh:
        text = fh.read().strip()
    if text.endswith("]"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    text = text.rstrip(",")
    while text:
        try:
            return json.loads(text + "]")
        except ValueError:
            cut = text.rfind("},")  # drop a half-written last event
            if cut < 0:
                break
            text = text[:cut + 1]
    raise ValueError(f"{path}: not a Horovod timeline")


def group_of(tensor: str) -> str:
    if "distft.syncbn." in tensor:
        return "bn_forward" if tensor.endswith(".stats") else "bn_backward"
    if "distft.grad." in tensor:
        return "gradients"
    return "other"


def spans(events: list) -> list:
    """(tensor, phase, start us, end us) of every top-level span: NEGOTIATE_* or the operation."""
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e.get("args", {})}
    stacks: dict = defaultdict(list)
    out = []
    for e in events:
        ph, pid = e.get("ph"), e.get("pid")
        if ph == "B":
            stacks[pid].append((e["name"], e["ts"]))
        elif ph == "E" and stacks[pid]:
            phase, start = stacks[pid].pop()
            if not stacks[pid]:
                out.append((names.get(pid, ""), phase, start, e["ts"]))
    return out


def summarise(events: list, skip: int = 5) -> dict:
    """Per step (the mean over the steps after `skip`): per group, how many collectives ran,
    milliseconds in which some of them were negotiating or transferring (overlapping spans
    count once: one bucket's tensors share one operation, and Horovod may fuse buckets), and
    the median transfer of one."""
    top = [(_base(tensor), phase, start, stop) for tensor, phase, start, stop in spans(events)
           if not re.search(r"_([2-9]|\d\d+)of\d+$", tensor)]  # a bucket's first tensor stands for it
    marks = sorted(start for tensor, phase, start, _ in top
                   if not phase.startswith("NEGOTIATE") and tensor.endswith("distft.grad.0"))
    if len(marks) < skip + 2:
        raise ValueError(f"the timeline holds {len(marks)} steps; at least {skip + 2} are needed")
    begin, end = marks[skip], marks[-1]
    steps = len(marks) - 1 - skip
    negotiate, transfer = defaultdict(list), defaultdict(list)
    for tensor, phase, start, stop in top:
        if begin <= start < end:
            (negotiate if phase.startswith("NEGOTIATE") else transfer)[group_of(tensor)].append((start, stop))
    out = {"steps": steps, "step_ms": (end - begin) / steps / 1e3, "groups": {}}
    for group in GROUPS:
        moved = transfer[group]
        out["groups"][group] = {
            "per_step": len(moved) / steps,
            "negotiate_ms_per_step": _covered(negotiate[group]) / steps / 1e3,
            "transfer_ms_per_step": _covered(moved) / steps / 1e3,
            "transfer_median_ms": statistics.median(b - a for a, b in moved) / 1e3 if moved else 0.0,
        }
    return out


def _base(tensor: str) -> str:
    return re.sub(r"_\d+of\d+$", "", tensor)


def _covered(intervals: list) -> float:
    """The length of the union of (start, stop) intervals."""
    total, reach = 0.0, None
    for start, stop in sorted(intervals):
        if reach is None or start > reach:
            total += stop - start
            reach = stop
        elif stop > reach:
            total += stop - reach
            reach = stop
    return total
