"""Horovod's cycle: short only where latency-bound sums wait on Horovod's queue."""
import pytest

from distft.distributed.world import horovod_cycle_ms, queue_cycle_ms


@pytest.mark.parametrize("gloo, statistics, thread_multiple, expected", [
    (False, "auto", True, "5"),  # MPI launcher: statistics over MPI, the queue carries gradients alone
    (False, "mpi", True, "5"),
    (False, None, True, "5"),  # dist.batchnorm: local, no solver
    (False, "horovod", True, "1"),  # statistics through Horovod's queue on request
    (False, "auto", False, "1"),  # MPI without MPI_THREAD_MULTIPLE: auto falls back to the queue
    (True, "auto", False, "1"),  # horovodrun --gloo: no MPI, the queue carries the statistics
    (True, "horovod", False, "1"),
    (True, None, False, "5"),  # Gloo without statistics
])
def test_cycle_follows_where_the_statistics_travel(gloo, statistics, thread_multiple, expected):
    assert queue_cycle_ms(gloo, statistics, thread_multiple) == expected


def test_a_cycle_horovod_would_take_but_not_as_a_number_is_reported_as_unknown():
    assert horovod_cycle_ms({"HOROVOD_CYCLE_TIME": "2.5"}) == 2.5
    assert horovod_cycle_ms({"HOROVOD_CYCLE_TIME": "1ms"}) is None and horovod_cycle_ms({"HOROVOD_CYCLE_TIME": ""}) is None
    assert horovod_cycle_ms({}) == 1.0  # unset: Horovod's own default
