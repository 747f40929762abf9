"""A job's configuration: the schema (`schema.py`), reading YAML and `--set` overrides into it
(`loading.py`, `convert.py`), the cross-field checks (`checks.py`) and the generated config table
(`doc.py`). The names below are the package's interface."""
from distft.config.loading import as_yaml, dump_config, load_config, read_yaml
from distft.config.schema import (GRID_KEYS, IMAGENET_MEAN, IMAGENET_STD, Config, DataConfig, DistConfig,
                                  FreezeConfig, HeadsConfig, MetricsConfig, ModelConfig, OptimizerConfig,
                                  TrainConfig)

__all__ = ["GRID_KEYS", "IMAGENET_MEAN", "IMAGENET_STD", "Config", "DataConfig", "DistConfig", "FreezeConfig",
           "HeadsConfig", "MetricsConfig", "ModelConfig", "OptimizerConfig", "TrainConfig", "as_yaml",
           "dump_config", "load_config", "read_yaml"]
