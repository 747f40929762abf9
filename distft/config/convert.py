"""YAML values into a section's typed fields: the conversions and the errors that name the key
path (`optimizer.lr`) and, for a misspelt key, the nearest real one."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Union

from distft.errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    """What a list of `tp` holds, as a sentence says it: `a list of strings`."""
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(
        tp, f"items ({_type_name(tp)})")


def convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {convert(k, key_tp, f"{path}"): convert(v, val_tp, f"{path}.{part(k)}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{path}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def part(key: Any) -> str:
    """A key as it appears in an error path: plain when it is a plain name, else quoted (so a
    key with a newline cannot break the one-line error)."""
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_\-]+", text) else repr(key)


def suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = path or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{part(key)}" if path else part(key)
        if key not in fields:
            known = [f"{path}.{name}" if path else name for name in fields]
            raise ConfigError(f"{key_path}: unknown key{suggest(key_path, known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, key_path)
            continue
        converted = convert(value, tp, key_path)
        meta = fields[key].metadata
        if "choices" in meta and converted not in meta["choices"]:
            raise ConfigError(f"{key_path}: must be one of {', '.join(meta['choices'])}, "
                              f"got {converted!r}{suggest(str(converted), list(meta['choices']))}")
        if "min" in meta and isinstance(converted, (int, float)) and converted < meta["min"]:
            raise ConfigError(f"{key_path}: must be >= {meta['min']}, got {converted!r}")
        kwargs[key] = converted
    return cls(**kwargs)
