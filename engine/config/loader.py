"""Config: dataclasses are the source of truth; YAML files mirror them flatly.

    cfg = load_config("configs/tiny.yaml", SFTJobConfig, overrides=["sft.lr=3e-4"])

The sections are declared once (engine/config/sections.py, training.py, study.py) and composed into the jobs
(engine/config/jobs.py); this module only reads, checks and writes them.

Each section is a dataclass whose fields carry defaults and whose `__post_init__` raises ValueError on
bad values. Loading checks every key and type against the dataclasses: an unknown key, a wrong type, a
bad value or a missing file is a `ConfigError` that names the file and the dotted key. Overrides use
`section.key=value`, with the value parsed as YAML (`3e-4`, `true`, `[1, 2]`, `null`).
No composition, no interpolation: what the file says is what runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from engine.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (recursing into dataclasses, lists, dicts, Optional)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _join(where: str, key: str) -> str:
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from a mapping; `where` prefixes every error (`tiny.yaml:` or `tiny.yaml: sft`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_join(where, key)}: unknown key (known keys: {known})")
    kwargs = {key: _convert(value, hints[key], _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation, or a required field is missing
        raise ConfigError(f"{where.rstrip(':')}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own message spans lines, with a snippet and a caret)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {_yaml_problem(exc)}") from None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def _check_override_keys(cls: type, overrides: list[str]) -> None:
    """An override of an unknown key names the --set flag, not the YAML file."""
    for override in overrides:
        key = override.partition("=")[0].strip()
        tp: Any = cls
        for part in key.split("."):
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set {key}: '{part}' is below a non-section value")
            hints = typing.get_type_hints(tp)
            if part not in hints:
                known = ", ".join(sorted(hints))
                raise ConfigError(f"--set {key}: unknown key '{part}' (known keys: {known})")
            tp = hints[part]
            args = [a for a in get_args(tp) if a is not type(None)]
            if get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
                tp = args[0]


def load_config(path: str | Path | None, cls: type[T], overrides: list[str] | None = None) -> T:
    """Read YAML at `path` (or start from defaults when None), apply `overrides`, validate into `cls`."""
    data: dict[str, Any] = {}
    label = "<defaults>"
    if path is not None:
        path = Path(path)
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    overrides = list(overrides or [])
    _check_override_keys(cls, overrides)
    for override in overrides:
        _apply_override(data, override)
    _check_unused_keys(cls, data, label)
    return from_dict(cls, data, f"{label}:")


def _check_unused_keys(cls: type, data: dict[str, Any], label: str) -> None:
    """A key of a shared section that this job would ignore is an error, not a silent no-op.

    A job lists such keys in `UNUSED: ClassVar[dict[str, str]]` ("section.key" -> what to do instead)."""
    for dotted, instead in getattr(cls, "UNUSED", {}).items():
        section, _, key = dotted.partition(".")
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            job = getattr(cls, "COMMAND", cls.__name__)
            raise ConfigError(f"{label}: {dotted}: `{job}` does not use this key ({instead}); remove it")


def add_config_arguments(parser) -> None:
    """The `CONFIG [--set section.key=value ...]` arguments of every config-driven subcommand."""
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set sft.lr=3e-4 (repeatable)")


def dump_config(cfg: Any, path: str | Path) -> None:
    """The resolved config as YAML that `load_config` reads back into the same job (keys the job does not use,
    which it would refuse, are left out)."""
    data = to_dict(cfg)
    for dotted in getattr(type(cfg), "UNUSED", {}):
        section, _, key = dotted.partition(".")
        data.get(section, {}).pop(key, None)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
