"""What a run prints: rank 0's log lines."""
from __future__ import annotations


def log(world, msg: str) -> None:
    if world.rank == 0:
        from .metrics import end_progress_line

        end_progress_line()
        print(f"[distft] {msg}", flush=True)


def warn(world, msg: str) -> None:
    log(world, f"warning: {msg}")
