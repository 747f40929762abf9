"""What a run writes into train.output before training: the resolved config and the class
names. Called only once every check has passed, so a refused run leaves the folder as it was."""
from __future__ import annotations

import os
from typing import Optional

from . import classes
from .config import Config, dump_config


def write_run_files(output: str, cfg: Config, class_names: Optional[list], num_classes: int) -> None:
    """Rank 0 only: `config.yaml` (resolved) and `classes.json`."""
    path = os.path.join(output, "config.yaml")
    tmp = f"{path}.tmp-{os.getpid()}"
    dump_config(cfg, tmp)
    os.replace(tmp, path)
    classes.save(output, class_names, num_classes)
