"""Learning-rate schedule as a pure function of the global step."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    kind: str  # constant | step | cosine
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0
    step_epochs: tuple = ()
    step_factor: float = 0.1
    min_lr: float = 0.0

    @classmethod
    def from_config(cls, opt, steps_per_epoch: int, total_steps: int, batch_ratio: float = 1.0) -> "LRSchedule":
        """`batch_ratio`: the job's global batch over data.batch_size (what `linear` scales by)."""
        scale = batch_ratio if opt.lr_scaling == "linear" else 1
        return cls(base_lr=opt.lr * scale, kind=opt.schedule, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, warmup_steps=opt.warmup_steps,
                   step_epochs=tuple(opt.step_epochs), step_factor=opt.step_factor, min_lr=opt.min_lr)

    def __call__(self, step: int) -> float:
        """Learning rate for the update made at global step `step` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            epoch = step // max(self.steps_per_epoch, 1)
            return self.base_lr * self.step_factor ** bisect.bisect_right(self.step_epochs, epoch)
        # cosine from the end of warm-up to the last step
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
