"""The run folder (`train.output`): the one place that knows where each of a run's files lives.

    checkpoints/ckpt-NNNNNNNN/   checkpoints (components/checkpoint.py)
    model.params                 the trained network (a grid's best head)
    heads/NAME/model.params      a grid's heads, each
    classes.json                 class names, index = label
    preprocess.json              the input the network expects (data/preprocess.py)
    config.yaml                  the resolved config
    log.jsonl                    every launch's log windows and events (what summary.json is built from)
    summary.json                 the run's figures
    report.png                   its curves
    cache/                       the feature cache's files, past train.cache_memory_bytes
"""
from __future__ import annotations

import os

from distft.errors import ConfigError

MODEL_FILE = "model.params"
CLASSES_FILE = "classes.json"
PREPROCESS_FILE = "preprocess.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.png"


class RunFolder:
    def __init__(self, root: str):
        self.root = root

    def _at(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def checkpoints(self) -> str:
        return self._at("checkpoints")

    @property
    def model(self) -> str:
        return self._at(MODEL_FILE)

    @property
    def heads(self) -> str:
        return self._at("heads")

    def head_model(self, name: str) -> str:
        return self._at("heads", name, MODEL_FILE)

    @property
    def classes(self) -> str:
        return self._at(CLASSES_FILE)

    @property
    def preprocess(self) -> str:
        return self._at(PREPROCESS_FILE)

    @property
    def config(self) -> str:
        return self._at(CONFIG_FILE)

    @property
    def log(self) -> str:
        return self._at(LOG_FILE)

    @property
    def summary(self) -> str:
        return self._at(SUMMARY_FILE)

    @property
    def report(self) -> str:
        return self._at(REPORT_FILE)

    @property
    def cache(self) -> str:
        return self._at("cache")

    def check_writable(self) -> None:
        """Create the folder if needed and prove a file can be written there (a one-line
        ConfigError naming train.output if not)."""
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = self._at(f".write-test-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as exc:
            raise ConfigError(f"train.output: {self.root}: cannot write there ({exc.strerror})") from None
