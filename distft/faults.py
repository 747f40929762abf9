"""Fault injection for tests: faults that are hard to cause on purpose, switched on by
environment variables (read where the fault would strike). Inert unless a variable is set.

    DISTFT_FAULT_NONFINITE_LOSS=R@S[:H]  rank R's loss at global step S (1-based) reads as NaN
                                      (only the loss: its gradients stay finite); with :H, only
                                      the loss of head H of a grid (e.g. 1@3:h2)
    DISTFT_FAULT_STOP_AT_STEP=S[@R]   a stop request (as SIGTERM would make) on rank R (default
                                      0) once global step S is done
    DISTFT_FAULT_CHECKPOINT_DELAY=T   writing a checkpoint takes T seconds longer (rank 0)
    DISTFT_FAULT_SYNCBN_BACKWARD_DELAY=T  each synchronized BatchNorm's backward starts T seconds
                                      late (every rank): the main thread runs a step ahead of it
"""
from __future__ import annotations

import os
from typing import Optional


def _pair(name: str) -> Optional[tuple[int, int]]:
    text = os.environ.get(name)
    if not text:
        return None
    first, _, second = text.partition("@")
    return int(first), int(second or 0)


def nonfinite_loss(rank: int, step: int, head: Optional[str] = None) -> bool:
    where, _, which = os.environ.get("DISTFT_FAULT_NONFINITE_LOSS", "").partition(":")
    if not where:
        return False
    first, _, second = where.partition("@")
    return (int(first), int(second or 0)) == (rank, step) and (not which or which == head)


def stop_requested(rank: int, step: int) -> bool:
    at = _pair("DISTFT_FAULT_STOP_AT_STEP")
    return at is not None and at[0] == step and at[1] == rank


def checkpoint_delay() -> float:
    return float(os.environ.get("DISTFT_FAULT_CHECKPOINT_DELAY", "0") or 0)


def syncbn_backward_delay() -> float:
    return float(os.environ.get("DISTFT_FAULT_SYNCBN_BACKWARD_DELAY", "0") or 0)
