"""A grid of heads as plain data (`heads.grid`): its points, each point's config, and the table
a grid run prints at its end."""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GridPoint:
    name: str
    overrides: dict  # config key -> value


def grid_points(grid: dict) -> list[GridPoint]:
    """One point per element of the product of the grid's lists, the last key fastest."""
    if not grid:
        return [GridPoint("h0", {})]
    keys = list(grid)
    return [GridPoint(f"h{i}", dict(zip(keys, values)))
            for i, values in enumerate(itertools.product(*(grid[k] for k in keys)))]


def head_config(cfg, overrides: dict):
    """`cfg` as a single run with these overrides would have it (`--set key=value`)."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".")
        value = {k: float(v) for k, v in value.items()} if isinstance(value, dict) else float(value)
        setattr(getattr(out, section), name, value)
    return out


def table(heads: list[dict], best: Optional[str]) -> str:
    """summary.json's `heads` as a Markdown table (what a grid run prints at its end)."""
    keys = list(heads[0]["overrides"]) if heads else []

    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    rows = ["| head | " + " | ".join(keys) + " | val top-1 | val loss | train loss | |",
            "|---|" + "---:|" * (len(keys) + 3) + "---|"]
    for h in heads:
        note = "best" if h["name"] == best else (f"diverged at step {h['diverged']['step']}" if h.get("diverged") else "")
        rows.append(f"| {h['name']} | " + " | ".join(f"{h['overrides'][k]:g}" if not isinstance(h["overrides"][k], dict)
                                                      else json.dumps(h["overrides"][k]) for k in keys)
                    + f" | {fmt(h['val_top1'])} | {fmt(h['val_loss'])} | {fmt(h['train_loss'])} | {note} |")
    return "\n".join(rows)


def describe(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the config as it is"
