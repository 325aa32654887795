"""Typed configs: dataclasses filled from a YAML file and ``--field value`` command-line overrides.

Every field of the dataclass is an accepted option and nothing else is; a wrong key or a value of the
wrong type is a one-line error naming it and what is allowed.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stepdistill.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``hint`` or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")  # accept "1,2,4" and "[1,2,4]"
            items = [v.strip() for v in text.split(",") if v.strip()]
        else:
            items = value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list of {item.__name__}")
        return [_coerce(name, v, item) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}={value!r} must be true or false")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name}={value!r} must be an integer")
        if hint in (int, float) and isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a number, not a boolean")
        try:
            return hint(value) if hint is not int else int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} must be of type {hint.__name__}") from None
    return value


def load_config(cls: type[T], config_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from an optional YAML file, then ``overrides`` on top; validates names and types."""
    types_by_name = _field_types(cls)
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value")
        values.update(loaded)
    values.update(overrides or {})
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; allowed options: {', '.join(sorted(types_by_name))}")
    kwargs = {k: _coerce(k, v, types_by_name[k]) for k, v in values.items()}
    config = cls(**kwargs)
    for check in ("validate", "validate_loop"):  # the trainer's own (it may derive loop values), then the loop's
        validate = getattr(config, check, None)
        if validate is not None:
            validate()
    return config


def field_help(cls: type) -> dict[str, str]:
    """Each field's inline ``# comment`` in the dataclass source (base classes included): the options' help text
    lives next to their definition, once."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+): [^\n]*?  # ([^\n]+)$", source, flags=re.MULTILINE):
            found[match.group(1)] = match.group(2).strip()
    return found


def format_help(cls: type, prog: str, current: Any | None = None) -> str:
    """Usage text: every option with its type, value (the defaults, or a loaded config's) and help."""
    notes = field_help(cls)
    summary = (cls.__doc__ or "").strip().splitlines()[:1]
    lines = [f"usage: {prog} [--config FILE.yaml] [--name value ...]", "", *summary, "", "options:"]
    for name, hint in sorted(_field_types(cls).items()):
        if current is not None:
            value = getattr(current, name)
        else:
            f = next(f for f in dataclasses.fields(cls) if f.name == name)
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        kind = str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__
        lines.append(f"  --{name} ({kind}, {value!r})")
        if name in notes:
            lines.append(f"      {notes[name]}")
    return "\n".join(lines)


def parse_cli(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse ``--config file.yaml --name value ...`` (also ``--name=value``) into ``cls``; ``-h``/``--help``
    prints every option with its default and help, then exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        rest = [a for a in argv if a not in ("-h", "--help")]
        current = parse_cli(cls, rest) if "--config" in rest or any(a.startswith("--config=") for a in rest) else None
        print(format_help(cls, Path(sys.argv[0]).name, current))
        raise SystemExit(0)
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options look like --name value")
        key, eq, val = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                val = "true"  # a bare flag such as --gradient_checkpointing
            else:
                i += 1
                val = argv[i]
        if key == "config":
            config_path = val
        else:
            overrides[key] = val
        i += 1
    return load_config(cls, config_path, overrides)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass, for logging and for writing next to outputs."""
    return dataclasses.asdict(config)
