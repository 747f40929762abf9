"""Make the demo's "pretrained" backbone: a short training run on digits 0-4 with our own
trainer, saved where the demo config's model.pretrained points."""
from __future__ import annotations

import os
import shutil

from distft.files import atomic_write
from distft.config import load_config
from distft.distributed.world import LocalWorld
from distft.errors import ConfigError
from distft.runfolder import RunFolder
from distft.train.run import run


def ensure_pretrained(config_path: str, overrides: list, pretrain_config: str = None) -> str:
    cfg = load_config(config_path, overrides)
    target = cfg.model.pretrained
    if not isinstance(target, str):
        raise ConfigError("model.pretrained: demo-prepare needs a file path to write the backbone to")
    if os.path.isfile(target):
        print(f"[distft] pretrained backbone already at {target}", flush=True)
        return target
    pretrain_config = pretrain_config or os.path.join(os.path.dirname(config_path or "."), "demo-pretrain.yaml")
    pre = load_config(pretrain_config, [f"model.name={cfg.model.name}", f"model.image_size={cfg.model.image_size}"])
    print(f"[distft] pretraining {pre.model.name} on {pre.data.train} -> {target}", flush=True)
    run(pre, LocalWorld())
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(RunFolder(pre.train.output).model, tmp))
    print(f"[distft] wrote pretrained backbone {target}", flush=True)
    return target
