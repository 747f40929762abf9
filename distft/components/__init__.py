"""The training components a job wires together, one concern each: the optimizer (`optim`, the
Trainer seam), the learning-rate schedule, the train state, checkpoints (`checkpoint`: the
format; `checkpointer`: as the job sees them), the feature cache, metrics, the summary,
validation, and the linear probe (`probe`, `objective`, `lbfgs`)."""
