"""Agreement between ranks as plain logic, against a fake world of two ranks (two threads that
exchange through a barrier): `agreed`, `agreed_everywhere`, the ballot's verdict and the
gradient buckets."""
import threading

import numpy as np
import pytest

from distft.distributed.agreement import agreed, agreed_everywhere, from_rank0
from distft.distributed.exchange import DEFAULT_BUCKET_BYTES, bucket_bytes_for, buckets, read_verdict
from distft.distributed.world import LocalWorld
from distft.errors import ConfigError, DataError, DistributedError


class FakeWorld(LocalWorld):
    """Rank `rank` of `size` ranks that run as threads of one process (its collectives are
    LocalWorld's, built on `allgather_bytes`)."""

    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared = rank, size, shared

    def allgather_bytes(self, payload, name):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        barrier.wait()
        slots[self.rank] = (name, payload)
        barrier.wait()
        names = {n for n, _ in slots}
        assert len(names) == 1, f"ranks in different collectives: {names}"
        out = [p for _, p in slots]
        barrier.wait()
        return out


def on_two_ranks(body):
    """Run body(world) on ranks 0 and 1; returns [(result or exception)] per rank."""
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=10)}
    out = [None, None]

    def rank(r):
        try:
            out[r] = body(FakeWorld(r, 2, shared))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_agreed_runs_on_rank_0_only_and_returns_its_result_there():
    calls = []
    out = on_two_ranks(lambda w: agreed(w, "writing", lambda: calls.append(w.rank) or "done"))
    assert calls == [0] and out == ["done", None]


def test_an_error_rank_0_meets_is_raised_on_every_rank_with_its_class_and_line():
    def fail():
        raise DataError("data.train: /x: gone")

    out = on_two_ranks(lambda w: agreed(w, "reading", fail))
    assert all(isinstance(e, DataError) and str(e) == "data.train: /x: gone" for e in out)


def test_a_bug_on_rank_0_becomes_a_distributed_error_everywhere():
    out = on_two_ranks(lambda w: agreed(w, "reading the checkpoints", lambda: 1 / 0))
    assert all(isinstance(e, DistributedError) for e in out)
    assert str(out[1]) == "rank 0 failed while reading the checkpoints: ZeroDivisionError: division by zero"


def test_agreed_everywhere_raises_the_error_one_rank_sees_on_every_rank_naming_it():
    def action(w):
        if w.rank == 1:
            raise ConfigError("metrics.port: 9400 is taken")
        return "ok"

    out = on_two_ranks(lambda w: agreed_everywhere(w, "serving metrics", lambda: action(w)))
    assert all(isinstance(e, ConfigError) and str(e) == "rank 1: metrics.port: 9400 is taken" for e in out)
    assert on_two_ranks(lambda w: agreed_everywhere(w, "x", lambda: w.rank)) == [0, 1]


def test_when_every_rank_fails_each_raises_the_lowest_ranks_error():
    def action(w):
        raise DataError(f"data.train: missing on node {w.rank}")

    out = on_two_ranks(lambda w: agreed_everywhere(w, "opening the data", lambda: action(w)))
    assert [str(e) for e in out] == ["rank 0: data.train: missing on node 0"] * 2
    assert all(isinstance(e, DataError) for e in out)


def test_from_rank0_gives_every_rank_rank_0s_value():
    assert on_two_ranks(lambda w: from_rank0(w, {"step": 40 + w.rank}, "resume")) == [{"step": 40}] * 2


def test_the_ballot_reads_stop_the_ranks_and_the_heads_whose_loss_was_not_finite():
    # slot 0: stop (any rank), 1 + r: rank r's loss not finite, then one slot per head; averaged
    v = read_verdict(np.array([0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0]), heads=2)  # 4 ranks, 2 heads
    assert v.stop and v.nonfinite_ranks == (1, 3) and v.nonfinite_heads == (0,)
    v = read_verdict(np.zeros(3))
    assert not v.stop and v.nonfinite_ranks == () and v.nonfinite_heads == ()


@pytest.mark.parametrize("sizes, limit, groups", [
    ([4, 4, 4], 8, [[0, 1], [2]]),
    ([10, 1, 1], 8, [[0], [1, 2]]),  # a tensor larger than a bucket has one of its own
    ([4, 4, 4], 0, [[0], [1], [2]]),  # 0: one bucket per tensor
    ([4, 40, 4], None, [[0, 1, 2]]),  # None: all in one
    ([], 8, []),
])
def test_gradient_buckets_keep_tensor_order_and_fill_to_the_limit(sizes, limit, groups):
    assert buckets(sizes, limit) == groups


def test_auto_buckets_send_every_gradient_after_backward_only_beside_synchronized_batchnorm():
    assert bucket_bytes_for("auto", synchronized_bn=True) is None
    assert bucket_bytes_for("auto", synchronized_bn=False) == DEFAULT_BUCKET_BYTES == 8 * 1024 * 1024
    # a number the user set stands either way
    assert bucket_bytes_for(65536, synchronized_bn=True) == 65536
    assert bucket_bytes_for(0, synchronized_bn=False) == 0
