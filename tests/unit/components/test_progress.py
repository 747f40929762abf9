"""The progress line: drawn only on a terminal outside any launcher, and always ended before
any other line is printed."""
import pytest

from distft.config import MetricsConfig
from distft.distributed.world import LocalWorld
from distft.components.metrics import Metrics, progress_wanted
from distft.console import log


@pytest.mark.parametrize("env, isatty, expected", [
    ({}, True, True),
    ({}, False, False),
    ({"OMPI_COMM_WORLD_RANK": "0"}, True, False),  # mpirun: a pseudo-terminal, even into a file
    ({"HOROVOD_RANK": "0"}, True, False),
    ({"SLURM_PROCID": "0"}, True, False),
])
def test_auto_progress_only_on_a_terminal_outside_launchers(env, isatty, expected):
    assert progress_wanted("auto", isatty, env) is expected
    assert progress_wanted("on", False, {"OMPI_COMM_WORLD_RANK": "0"}) is True
    assert progress_wanted("off", True, {}) is False


def test_a_log_line_after_the_progress_line_starts_a_line_of_its_own(tmp_path, capsys):
    m = Metrics(MetricsConfig(port=0, progress="on", report=False), LocalWorld(), str(tmp_path), 1)
    m.startup({"trainable_params": 1, "frozen_params": 1}, 0, forward_rate=None)
    m.step(samples=8, seconds=0.01, data=0.0, allreduce=0.0, allreduce_bytes=0, loss=0.5, lr=0.1, epoch=0)
    m.window(global_step=1, total_steps=4, epoch=0, loss=0.5, lr=0.1)
    log(LocalWorld(), "epoch 0 val top1 0.5000")
    m.window(global_step=2, total_steps=4, epoch=0, loss=0.5, lr=0.1)
    m.finish({})
    out = capsys.readouterr().out
    lines = out.split("\n")
    assert lines[0].startswith("\r[distft] step 1/4") and lines[1] == "[distft] epoch 0 val top1 0.5000"
    assert lines[2].startswith("\r[distft] step 2/4") and lines[3] == ""  # finish ends it too
    assert out.count("\n") == 3
