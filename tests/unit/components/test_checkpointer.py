"""The checkpointer as plain logic: its cadence (one rule, inside an epoch and at its end), and
save/load through stateful parts, written in the checkpoint format old runs resume from."""
import json
import os

import mxnet as mx
import numpy as np
import pytest

from distft.components import checkpoint
from distft.components.checkpointer import Checkpointer
from distft.components.state import TrainState
from distft.config import load_config
from distft.distributed.world import LocalWorld


class Part:
    """A stateful part: what it saved, and what it was given back."""

    def __init__(self, arrays, meta):
        self.arrays, self.meta, self.loaded = arrays, meta, None

    def state_dict(self):
        return {"arrays": dict(self.arrays), **self.meta}

    def load_state_dict(self, state):
        self.loaded = state
        return 7  # bytes it would have broadcast


def checkpointer(tmp_path, *overrides, steps_per_epoch=10, total_steps=100, state=None, weights=None,
                 optimizer=None):
    cfg = load_config(None, [f"train.output={tmp_path / 'out'}", "model.pretrained=false", *overrides])
    ckpt = Checkpointer(cfg, LocalWorld(), mx.cpu())
    prepared = []

    def prepare(at):
        prepared.append(at.step)
        return "digest-of-step-%d" % at.step

    ckpt.track(state or TrainState(global_batch=8), weights or Part({}, {}), optimizer or Part({}, {}),
               data={"digest": "d", "files": 3}, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               prepare=prepare)
    return ckpt, prepared


def at_step(ckpt, step):
    """The state after `step` steps of 10 per epoch, not yet moved to the next epoch."""
    epoch, into = divmod(step, 10)
    if into == 0 and step:
        epoch, into = epoch - 1, 10
    ckpt.state.epoch, ckpt.state.step, ckpt.state.samples_in_epoch = epoch, step, into * ckpt.state.global_batch


def test_every_steps_is_due_inside_an_epoch_but_waits_for_the_boundary_at_its_end(tmp_path):
    ckpt, _ = checkpointer(tmp_path, "train.checkpoint_every_steps=5", "train.checkpoint_every_epochs=0")
    due = {}
    for step in range(1, 31):
        at_step(ckpt, step)
        due[step] = (ckpt.due(boundary=False), ckpt.due(boundary=True))
    inside = [s for s, (mid, _) in due.items() if mid]
    assert inside == [5, 15, 25]  # 10, 20, 30 end an epoch: saved at the boundary, after validation
    assert [s for s in (10, 20, 30) if due[s][1]] == [10, 20, 30]
    assert not due[7][1] and not due[10][0]


def test_every_epochs_is_due_at_the_boundary_of_every_nth_epoch_and_the_job_end_always(tmp_path):
    ckpt, _ = checkpointer(tmp_path, "train.checkpoint_every_steps=null", "train.checkpoint_every_epochs=2",
                           total_steps=45)
    boundary = []
    for step in range(1, 46):
        at_step(ckpt, step)
        assert not ckpt.due(boundary=False)
        if ckpt.due(boundary=True):
            boundary.append(step)
    assert boundary == [20, 40, 45]  # epochs 1 and 3 (0-based) end; 45 is the last step (mid-epoch)


def test_save_writes_the_parts_in_the_checkpoint_format_and_load_gives_them_back(tmp_path):
    weights = Part({"output.weight": mx.nd.array(np.arange(6).reshape(2, 3))}, {"diverged_heads": {}})
    optimizer = Part({"output.weight#0": mx.nd.ones((2, 3))}, {"update_counts": {"output.weight": 3},
                                                                "loss_scale": {}, "lr": 0.5})
    state = TrainState(epoch=0, samples_in_epoch=24, step=3, global_batch=8)
    ckpt, prepared = checkpointer(tmp_path, "model.classes=5", "train.checkpoint_every_steps=null", state=state,
                                  weights=weights, optimizer=optimizer)
    assert ckpt.save() is None and prepared == []  # not due: nothing written, no sync
    path = ckpt.save(force=True)
    assert prepared == [3] and path == os.path.join(str(tmp_path / "out"), "checkpoints", "ckpt-00000003")
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert meta["format"] == checkpoint.FORMAT_VERSION and meta["step"] == 3
    assert meta["state"] == {"epoch": 0, "samples_in_epoch": 24, "step": 3, "plan_epoch": 0, "world_size": 1,
                             "global_batch": 8}
    assert (meta["epoch"], meta["world_size"], meta["state_digest"]) == (0, 1, "digest-of-step-3")
    assert meta["model"] == "resnet18_v2" and meta["classes"] == 5 and meta["data"] == {"digest": "d", "files": 3}
    assert meta["job"]["model.name"] == "resnet18_v2"
    assert meta["update_counts"] == {"output.weight": 3} and meta["lr"] == 0.5 and meta["diverged_heads"] == {}
    assert set(meta["files"]) == {"trainable.params", "optimizer.params"}

    fresh_weights, fresh_optimizer = Part({}, {}), Part({}, {})
    again, _ = checkpointer(tmp_path, "model.classes=5", weights=fresh_weights, optimizer=fresh_optimizer)
    resumed = again.find_resume_point()
    assert resumed["state"]["step"] == 3
    assert again.load() == 14  # each part's bytes
    got = fresh_weights.loaded
    assert got["path"] == path and got["update_counts"] == {"output.weight": 3}
    assert np.array_equal(got["arrays"]["output.weight"].asnumpy(), np.arange(6).reshape(2, 3))
    assert list(fresh_optimizer.loaded["arrays"]) == ["output.weight#0"]


def test_load_without_a_checkpoint_restores_nothing(tmp_path):
    fresh = Part({}, {})
    ckpt, _ = checkpointer(tmp_path, weights=fresh)
    assert ckpt.find_resume_point() is None and ckpt.load() == 0 and fresh.loaded is None


@pytest.mark.parametrize("every_steps", ["null", 4])
def test_a_solve_checkpoints_on_its_steps_alone(tmp_path, every_steps):
    """A solve's pass is an epoch of its own: it saves on train.checkpoint_every_steps only."""
    ckpt, _ = checkpointer(tmp_path, f"train.checkpoint_every_steps={every_steps}")
    due = []
    for step in range(1, 13):
        ckpt.state.step = step
        if ckpt.steps_due():
            due.append(step)
    assert due == ([4, 8, 12] if every_steps == 4 else [])
