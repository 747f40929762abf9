"""Horovod's timeline (HOROVOD_TIMELINE, written by rank 0) summarised per training step, for
`distft bench`: how long a step's collectives took to move their bytes, and how long they
waited before they could start.

For each collective Horovod records two spans, from the coordinator's point of view:
- NEGOTIATE_*: from rank 0's background thread first seeing the tensor until it finds every
  rank has queued it. That is the lag of the slower rank, plus Horovod's own round trip (a
  worker's request reaches rank 0 once per cycle), plus any time the thread spent running other
  collectives meanwhile (it runs one at a time);
- the operation itself (ALLREDUCE, ALLGATHER, ...): the transfer, every rank ready. Horovod may
  fuse several tensors (one bucket's, or several buckets) into one operation.

Collectives are grouped by distft's names: `distft.syncbn.<layer>.stats` (a synchronized BN's
forward), `.grad` (its backward), `distft.grad.<bucket>` (the gradient exchange) and the rest.
A step starts with the operation that carries gradient bucket 0 (one per step); the first
`skip` steps (graph building, the response cache filling) are left out. The groups' spans may
overlap one another (a BN exchange negotiating while a bucket transfers): they do not add up to
the step.
"""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict

GROUPS = ("bn_forward", "bn_backward", "gradients", "other")


def load(path: str) -> list:
    """The timeline's events. Horovod rewrites the array's closing bracket after each event; a
    file cut short (a rank killed mid-write) still reads up to its last whole event."""
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
    """Per step (the mean over the steps after `skip`), per group: operations (overlapping
    transfers of a group merged into one: one bucket's tensors, buckets Horovod fused), the
    milliseconds in which some of its collectives were negotiating or transferring, and the
    median length of one operation."""
    top = [(group_of(tensor), _base(tensor), phase, start, stop) for tensor, phase, start, stop in spans(events)]
    negotiate, transfer = defaultdict(list), defaultdict(list)
    for group, base, phase, start, stop in top:
        (negotiate if phase.startswith("NEGOTIATE") else transfer)[group].append(
            (start, stop, base.endswith("distft.grad.0")))
    operations = {group: _merged(transfer[group]) for group in GROUPS}
    marks = [start for start, _, carries_bucket_0 in operations["gradients"] if carries_bucket_0]
    if len(marks) < skip + 2:
        raise ValueError(f"the timeline holds {len(marks)} steps; at least {skip + 2} are needed")
    begin, end = marks[skip], marks[-1]
    steps = len(marks) - 1 - skip

    def clipped(intervals):  # the time inside the window
        return [(max(a, begin), min(b, end)) for a, b, _ in intervals if a < end and b > begin]

    out = {"steps": steps, "step_ms": (end - begin) / steps / 1e3, "groups": {}}
    for group in GROUPS:
        ops = [(a, b) for a, b, _ in operations[group] if begin <= a < end]  # counted where they start
        out["groups"][group] = {
            "per_step": len(ops) / steps,
            "negotiate_ms_per_step": _covered(clipped(negotiate[group])) / steps / 1e3,
            "transfer_ms_per_step": _covered(clipped(operations[group])) / steps / 1e3,
            "transfer_median_ms": statistics.median(b - a for a, b in ops) / 1e3 if ops else 0.0,
        }
    return out


def _merged(intervals: list) -> list:
    """(start, stop, flag) intervals merged where they overlap (one touching the next is not
    merged); a merged one's flag is any of its members'. On CPU Horovod runs one operation at a
    time, so overlapping transfers are one operation; on GPU, where it records an operation's
    end later, consecutive ones may overlap and be undercounted (not run)."""
    out: list = []
    for start, stop, flag in sorted(intervals):
        if out and start < out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[1], stop), last[2] or flag)
        else:
            out.append((start, stop, flag))
    return out


def _base(tensor: str) -> str:
    return re.sub(r"_\d+of\d+$", "", tensor)


def _covered(intervals: list) -> float:
    """The length of the union of (start, stop) intervals."""
    return sum(b - a for a, b, _ in _merged([(a, b, False) for a, b in intervals]))
