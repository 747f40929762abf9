"""Warnings for jobs that run but are probably not what the user meant (printed by rank 0)."""
from __future__ import annotations

MIN_STEPS_PER_EPOCH = 10


def frozen_weights(plan) -> int:
    """Learnable scalars the plan freezes (not BatchNorm statistics, not a gamma built fixed)."""
    return sum(p.spec.size for p in plan.params
               if not p.trainable and p.spec.differentiable and p.spec.grad_req != "null")


def warnings(cfg, plan, steps_per_epoch: int, train_samples: int) -> list[str]:
    found = []
    frozen_params = frozen_weights(plan)
    if cfg.model.pretrained is False and frozen_params:
        found.append(f"model.pretrained: false, yet {frozen_params:,} parameters are frozen: they keep their "
                     "random initial values, so the head trains on random features (set model.pretrained, "
                     "or freeze.trainable: ['/.*/'] to train everything)")
    if steps_per_epoch < MIN_STEPS_PER_EPOCH and cfg.optimizer.name != "lbfgs":  # a solve: one step a pass
        found.append(f"data.train: {train_samples} samples make {steps_per_epoch} step(s) per epoch at the "
                     f"global batch; under {MIN_STEPS_PER_EPOCH}, per-epoch figures (validation, checkpoints, "
                     "throughput) say little: use more data or a smaller data.batch_size")
    return found
