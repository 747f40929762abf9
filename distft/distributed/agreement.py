"""Agreement between ranks: every decision and every state that must be the same on all ranks
is made from agreed data (a collective every rank takes part in), never from a rank-local value.

- `check_same_config`, `agree_on_start_state`: the same job and the same model before step 1.
- `agreed`: an outcome only rank 0 can see (reading or writing a checkpoint) reaches every rank,
  so that all ranks go on, or all leave with the same one-line error and exit code.
- `sync_point`: the one sequence that brings all ranks to the same state and proves it (finish
  pending work, average local BatchNorm statistics, compare state digests). Checkpoints,
  freeze-plan switches, validation and the end of the run call it.
"""
from __future__ import annotations

import hashlib
import json

import mxnet as mx
import numpy as np

from distft import errors
from distft.console import warn
from distft.distributed.world import digest
from distft.errors import DistftError, DistributedError


def state_digest(params: dict, names=None) -> str:
    """sha256 over the named parameters and BN statistics (all by default), in name order."""
    h = hashlib.sha256()
    for name in sorted(names if names is not None else params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name].data().asnumpy()))  # its buffer: no second copy
    return h.hexdigest()


def check_same_config(world, cfg) -> int:
    """Every rank must run the same job. The pretrained path may differ between nodes (its
    content is checked by the frozen-weight hashes)."""
    doc = cfg.to_dict()
    doc["model"].pop("pretrained")
    mine = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()
    everyone = world.allgather_bytes(mine, "distft.config")
    odd = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if odd:
        raise DistributedError(f"ranks {odd} run a different config from rank 0 (same --config and --set on every rank?)")
    return len(mine) * world.size


def differing_tensors(world, params: dict, names: list[str]) -> tuple[dict[str, list[int]], int]:
    """Hash each named tensor on every rank; returns ({name: ranks disagreeing with rank 0},
    bytes exchanged). One allgather of 8-byte digests, not of the tensors."""
    payload = b"".join(digest(params[n].data().asnumpy()) for n in names)
    everyone = world.allgather_bytes(payload, "distft.state_digests")
    if any(len(d) != len(payload) for d in everyone):
        raise DistributedError("ranks hold different parameter sets (different model or freeze plan)")
    bad: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        for r, d in enumerate(everyone):
            if d[8 * i:8 * i + 8] != everyone[0][8 * i:8 * i + 8]:
                bad.setdefault(name, []).append(r)
    return bad, len(payload) * world.size


def agree_on_start_state(world, plan, params, on_frozen_mismatch: str, trainable_start: str,
                         heads_state: tuple = ()) -> tuple[int, int]:
    """Make every rank hold rank 0's model before the first step, moving as few bytes as it can.

    Frozen tensors are verified by hash: a mismatch means ranks loaded different pretrained
    files, so the job stops (or, if asked, re-broadcasts them). Trainable state is either
    broadcast whole, or verified the same way with only the differing tensors broadcast (after a
    resume, where rank 0 alone read the checkpoint, that is whatever training changed).
    `heads_state`: the trainable state of a grid's other heads, treated as trainable.
    Returns (control bytes exchanged, tensor bytes broadcast)."""
    frozen = plan.frozen_names()
    trainable = plan.trainable_state_names() + list(heads_state)
    checked = frozen + (trainable if trainable_start == "verify" else [])
    bad, exchanged = differing_tensors(world, params, checked)
    bad_frozen = [n for n in frozen if n in bad]
    if bad_frozen and on_frozen_mismatch == "error":
        first = bad_frozen[0]
        raise DistributedError(
            f"frozen parameter {first} differs between ranks: rank(s) {bad[first]} disagree with rank 0"
            + (f" ({len(bad_frozen) - 1} more frozen tensors differ)" if len(bad_frozen) > 1 else "")
            + "; every rank must load the same pretrained file (model.pretrained), "
              "or set dist.on_frozen_mismatch: broadcast")
    if bad_frozen:
        warn(world, f"{len(bad_frozen)} frozen tensors differed between ranks (first {bad_frozen[0]}); "
                    "re-broadcast from rank 0")
    send = bad_frozen + (trainable if trainable_start == "broadcast" else [n for n in trainable if n in bad])
    return exchanged, world.broadcast_([params[n].data() for n in send], "distft.start_state") if send else 0


def check_rank_digests(world, params: dict, where: str, names=None) -> list[str]:
    mine = state_digest(params, names)
    digests = [d.decode() for d in world.allgather_bytes(mine.encode(), f"distft.digest.{where}")]
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise DistributedError(f"{where}: ranks {odd} hold a different model from rank 0 "
                               f"(state digest {digests[odd[0]][:12]} != {digests[0][:12]})")
    return digests


def average_moving_stats(world, params: dict, names: list[str]) -> None:
    """`dist.batchnorm: local`: running statistics differ per rank; average them so all agree."""
    if world.size > 1 and names:
        world.allreduce_([params[n].data() for n in names], "distft.bn_stats", average=True)
        mx.nd.waitall()


def sync_point(world, settle, params: dict, local_stats: list[str], where: str, names=None) -> list[str]:
    """Bring every rank to the same state and prove it: finish pending work (`settle`: the
    deferred finiteness check), average the BatchNorm statistics that `dist.batchnorm: local`
    lets drift apart (`local_stats`), compare state digests (over `names`, default all).
    Returns the digests, one per rank."""
    settle()
    average_moving_stats(world, params, local_stats)
    return check_rank_digests(world, params, where, names)


def agreed(world, what: str, action):
    """Run `action` on rank 0 only, and let every rank learn how it went: its result is
    returned on rank 0 (None elsewhere); a DistftError it raised is raised on every rank, with
    the same class and message. Any other exception becomes a DistributedError naming it, on
    every rank (rank 0 included)."""
    result, failure, original = None, None, None
    if world.rank == 0:
        try:
            result = action()
        except DistftError as exc:
            failure = {"type": type(exc).__name__, "message": str(exc)}
            original = exc
        except Exception as exc:  # noqa: BLE001 - a bug or an OS error: every rank must still leave
            failure = {"type": "DistributedError", "message": f"rank 0 failed while {what}: "
                                                              f"{type(exc).__name__}: {exc}"}
            original = exc
    failure = from_rank0(world, failure, f"distft.outcome.{what}")
    if failure is None:
        return result
    if isinstance(original, DistftError):
        raise original
    cls = getattr(errors, failure["type"], DistributedError)
    if not (isinstance(cls, type) and issubclass(cls, DistftError)):
        cls = DistributedError
    raise cls(failure["message"]) from original  # rank 0 too: the same one line everywhere


def agreed_everywhere(world, what: str, action):
    """Run `action` on every rank. An error any rank sees (a file missing on one node, a port
    taken on one machine) is raised on every rank with the same message, naming the rank, so
    that no rank waits in a later collective for one that left."""
    failure = None
    try:
        result = action()
    except DistftError as exc:
        result, failure = None, {"type": type(exc).__name__, "message": str(exc), "rank": world.rank}
    if world.size > 1:
        found = world.allgather_json(failure, f"distft.everywhere.{what}")
        failure = next((f for f in found if f), None)
        if failure is not None:
            failure["message"] = f"rank {failure['rank']}: {failure['message']}"
    if failure is None:
        return result
    cls = getattr(errors, failure["type"], DistributedError)
    raise cls(failure["message"])


def from_rank0(world, value, name: str):
    """Rank 0's JSON-able `value`, on every rank."""
    if world.size == 1:
        return value
    payload = json.dumps(value).encode() if world.rank == 0 else b""
    return json.loads(world.allgather_bytes(payload, name)[0])
