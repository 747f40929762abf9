"""The learning-rate schedule: a pure function of the global step (warm-up, step, cosine to
min_lr), and lr_scaling: linear by the job's global batch."""
import math

import pytest

from distft.config import load_config
from distft.components.schedule import LRSchedule


def schedule(*overrides, steps_per_epoch=10, total=100, batch_ratio=1.0):
    opt = load_config(None, [f"optimizer.{o}" for o in overrides]).optimizer
    return LRSchedule.from_config(opt, steps_per_epoch, total, batch_ratio)


def test_warm_up_rises_linearly_to_the_base_rate_then_constant_holds_it():
    s = schedule("lr=0.4", "warmup_steps=4", "schedule=constant")
    assert [s(t) for t in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert s(10_000) == pytest.approx(0.4)


def test_step_multiplies_by_the_factor_at_each_listed_epoch():
    s = schedule("lr=1.0", "schedule=step", "step_epochs=[2, 5]", "step_factor=0.1", steps_per_epoch=10)
    assert s(0) == s(19) == pytest.approx(1.0)
    assert s(20) == s(49) == pytest.approx(0.1)  # epoch 2 starts at step 20
    assert s(50) == s(99) == pytest.approx(0.01)


def test_cosine_runs_from_the_end_of_warm_up_to_min_lr_at_the_last_step():
    s = schedule("lr=1.0", "schedule=cosine", "warmup_steps=10", "min_lr=0.1", total=110)
    assert s(9) == pytest.approx(1.0)  # the last warm-up step reaches the base rate
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)  # never below min_lr
    assert all(s(t) >= s(t + 1) for t in range(10, 110))


def test_linear_scaling_multiplies_by_the_jobs_global_batch_over_the_batch_size():
    """The ratio is the job's (global batch / data.batch_size), fixed at the first launch, so a
    job resumed on another world size keeps its learning rate."""
    assert schedule("lr=0.1", "lr_scaling=linear", batch_ratio=8)(5) == pytest.approx(0.8)
    assert schedule("lr=0.1", "lr_scaling=none", batch_ratio=8)(5) == pytest.approx(0.1)
    warm = schedule("lr=0.1", "lr_scaling=linear", "warmup_steps=2", batch_ratio=4)
    assert [warm(0), warm(1), warm(2)] == pytest.approx([0.2, 0.4, 0.4])


def test_a_job_scales_its_rate_by_its_own_global_batch_and_keeps_it_when_resumed(tmp_path):
    """lr_scaling: linear takes the job's global batch (16: 2 micro-batches of 8 on one rank, not
    data.batch_size x world size), after warm-up and again in a resumed launch: the learning
    rate each step used, as log.jsonl records it."""
    from conftest import read_summary, small_config, write_config
    from distft.distributed.world import LocalWorld
    from distft.train.run import run

    doc = small_config(tmp_path, False, data={"global_batch": 16},
                       optimizer={"lr": 0.05, "lr_scaling": "linear", "warmup_steps": 2},
                       train={"max_steps": 3, "checkpoint_every_steps": 1})
    path = write_config(tmp_path / "c.yaml", doc)
    run(load_config(path, ["train.max_steps=2"]), LocalWorld())
    run(load_config(path), LocalWorld())  # resumed at step 2
    s = read_summary(tmp_path / "out")
    assert s["resumed"] and s["steps_this_run"] == 1 and s["global_batch"] == 16 and s["accumulation"] == 2
    # 0.05 x 16 / data.batch_size 8, reached at the end of the 2 warm-up steps
    assert [h["lr"] for h in s["history"]] == pytest.approx([0.05, 0.1, 0.1])
