"""Job configuration: YAML into typed dataclasses, `--set a.b=c` overrides, strict validation.

Every error names the key path (`optimizer.lr`) and, for a misspelt key, the nearest real one.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import yaml

from distft.config.checks import check
from distft.config.convert import build
from distft.config.schema import Config
from distft.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: PyYAML follows YAML 1.1, whose floats need
    a dot and a signed exponent, so `1e-3` (how everyone writes a learning rate) would be the
    string '1e-3'. YAML 1.2 reads it as a number, as JSON and Python do."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(stream) -> Any:
    """A YAML document as distft reads every config (YAML 1.2 floats; no arbitrary objects)."""
    return yaml.load(stream, Loader=YamlLoader)  # a SafeLoader: plain data only


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], c); the value is read as YAML so `true`, `0.1`, `[a, b]` work."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text}: bad key path {key!r}")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from None
    return parts, value


def apply_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    raw: Any = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path) as fh:
                raw = read_yaml(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(raw, parts, value)
    cfg = build(Config, raw, "")
    check(cfg)
    return cfg


def as_yaml(value: Any) -> str:
    """A value as a config file writes it: false, [features.8, output], 0.001, null."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
