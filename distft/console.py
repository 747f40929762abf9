"""What a run prints: rank 0's log lines, and the progress line drawn over itself on a terminal."""
from __future__ import annotations

import sys

_progress_open = False  # a progress line is drawn and not yet ended


def draw_progress(text: str) -> None:
    global _progress_open
    sys.stdout.write("\r" + text)
    sys.stdout.flush()
    _progress_open = True


def end_progress_line() -> None:
    """End a drawn progress line, so that the next line printed starts a line of its own. Call
    before printing anything while training runs."""
    global _progress_open
    if _progress_open:
        sys.stdout.write("\n")
        sys.stdout.flush()
        _progress_open = False


def log(world, msg: str) -> None:
    if world.rank == 0:
        end_progress_line()
        print(f"[distft] {msg}", flush=True)


def warn(world, msg: str) -> None:
    log(world, f"warning: {msg}")
