"""Loading run configurations: YAML with ``base:`` chains, dotted overrides
and typed building of dataclasses from plain data.

A config file is a YAML mapping whose top-level keys are the sections of the
root config (``training/config.py``); each section's dataclass and rules sit
beside the code it configures (``model/config.py``, ``model/memory/config.py``,
``data/config.py``, ``parallel/mesh.py``, ``training/config.py``). A file may
name a ``base:`` file (relative to itself) whose values it extends; mappings
are merged key by key, anything else is replaced. Command-line overrides are
``dotted.key=value`` with the value parsed as YAML (``optimizer.lr=1e-3``,
``train.resume=false``, ``data.source=/path/to/texts``).

Every problem (an unknown key, a value of the wrong type, an impossible
combination) raises :class:`ConfigError` naming the key, the value and what
is allowed, before anything is built or compiled. A number must be finite
(``.inf`` and ``.nan`` are refused for every float key). A key typed
:data:`PathStr` holds a file system path: a leading ``~`` is expanded when
the config is built, so ``train.run_dir: ~/runs/x`` means the home
directory, as ``data.source`` always did. This module is the lowest layer
of the package: it imports nothing from it, so every layer can use it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
import tempfile
import types
import typing
from typing import Annotated, Any, Literal

import yaml


class ConfigError(ValueError):
  """A configuration value that cannot be used; the message names the key."""


# A config value that is a file system path: built as a string with a
# leading ``~`` expanded (``os.path.expanduser``).
PATH_MARK = "path"
PathStr = Annotated[str, PATH_MARK]


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
  """Raises ConfigError "`key`: got `value`; `allowed`" unless `ok`."""
  if not ok:
    raise ConfigError(f"{key}: got {value!r}; {allowed}")


def require_writable_dir(path: str | os.PathLike, key: str) -> None:
  """ConfigError naming `key` unless the directory `path` exists or can be
  created, and accepts new files: the nearest existing ancestor must be a
  directory in which a probe directory can be made (a real write, so it
  also holds for root, for whom permission bits do not forbid writing)."""
  path = pathlib.Path(path)
  probe_in = path
  while not probe_in.exists():
    if probe_in.parent == probe_in:
      break
    probe_in = probe_in.parent
  if not probe_in.is_dir():
    what = "is not a directory" if probe_in == path else (
        f"cannot be created: {str(probe_in)!r} is not a directory")
    raise ConfigError(f"{key}: {str(path)!r} {what}")
  try:
    pathlib.Path(tempfile.mkdtemp(prefix=".write-probe-", dir=probe_in)).rmdir()
  except OSError as e:
    raise ConfigError(f"{key}: {str(path)!r} is not writable "
                      f"({e.strerror} in {str(probe_in)!r})") from None


# --------------------------------------------------------------------------
# Building typed values from plain data
# --------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
  origin = typing.get_origin(tp)
  if origin is Annotated:
    return _type_name(typing.get_args(tp)[0])
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if origin is dict:
    k, v = typing.get_args(tp)
    return f"a mapping of {_type_name(k)} to {_type_name(v)}"
  if dataclasses.is_dataclass(tp):
    return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
  if tp is type(None):
    return "null"
  if tp is Any:
    return "any value"
  return {int: "an integer", float: "a number", bool: "true or false",
          str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(tp: Any, value: Any, key: str) -> Any:
  """Converts plain YAML data `value` to type `tp`, or raises ConfigError."""
  origin = typing.get_origin(tp)
  bad = ConfigError(
      f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
  if origin is Annotated:
    base, *marks = typing.get_args(tp)
    built = _build(base, value, key)
    return os.path.expanduser(built) if PATH_MARK in marks else built
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise bad
    return build_dataclass(tp, value, key)
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise bad
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _build(arg, value, key)
      except ConfigError:
        pass
    raise bad
  if origin is dict:
    ktp, vtp = typing.get_args(tp)
    if not isinstance(value, dict):
      raise bad
    return {_build(ktp, k, f"{key}.{k}"): _build(vtp, v, f"{key}.{k}")
            for k, v in value.items()}
  return _build_scalar(tp, value, key, bad)


def _build_scalar(tp: Any, value: Any, key: str, bad: ConfigError) -> Any:
  """A bool, int, float, str or Any value of a config; `bad` is the error
  raised for a value of another type."""
  if tp is bool:
    if not isinstance(value, bool):
      raise bad
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad
    return value
  if tp is float:
    # YAML 1.1 reads `1e-3` (no dot) as a string; accept such numbers.
    if isinstance(value, str):
      try:
        number = float(value)
      except ValueError:
        raise bad from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad
    else:
      number = float(value)
    # No float key gives inf or nan a meaning; they would only surface as
    # a diverged or silently broken run.
    require(math.isfinite(number), key, value, "must be a finite number")
    return number
  if tp is str:
    if not isinstance(value, str):
      raise bad
    return value
  if tp is Any:  # checked where it is used (e.g. task parameters)
    return value
  raise TypeError(f"unsupported config type {tp!r} at {key}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
  """An instance of the dataclass `cls` from the plain mapping `values`;
  every key must be a field, every value of the field's type. `prefix` is
  the dotted key of `values` in the whole config (for the messages)."""
  hints = typing.get_type_hints(cls, include_extras=True)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for k, v in values.items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if k not in hints:
      raise ConfigError(
          f"{key}: unknown key (value {v!r}); allowed keys here are: "
          f"{', '.join(names)}")
    kwargs[k] = _build(hints[k], v, key)
  return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
  """The config as plain data (what is written next to a run)."""
  return dataclasses.asdict(cfg)


def merge(base: dict, update: dict) -> dict:
  """`update` merged key by key onto `base`, as a new mapping that shares no
  container with either input."""
  out = copy.deepcopy(base)
  for k, v in update.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = merge(out[k], v)
    else:
      out[k] = copy.deepcopy(v)
  return out


def yaml_mapping(path: pathlib.Path, what: str) -> dict:
  """The top-level mapping of the YAML file `path`, or a ConfigError that
  names it as `what` ("config file", "sweep file") and says what is wrong:
  a directory, missing, not YAML, or not a mapping."""
  if path.is_dir():
    raise ConfigError(f"{what} {str(path)!r} is a directory; expected a "
                      "YAML file")
  if not path.is_file():
    raise ConfigError(f"{what} {str(path)!r} does not exist")
  try:
    data = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from e
  if not isinstance(data, dict):
    raise ConfigError(f"{what} {str(path)!r}: expected a mapping at top level")
  return data


def read_yaml(path: str | os.PathLike,
              seen: tuple[pathlib.Path, ...] = ()) -> dict:
  """Reads a config file, following its `base:` chain."""
  path = pathlib.Path(path).resolve()
  if path in seen:
    raise ConfigError(f"base: {path} is included in a cycle")
  data = yaml_mapping(path, "config file")
  base = data.pop("base", None)
  if base is None:
    return data
  if not isinstance(base, str):
    raise ConfigError(f"base: got {base!r} in {path}; expected a file path")
  return merge(read_yaml(path.parent / base, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
  if "=" not in text:
    raise ConfigError(
        f"override {text!r}: expected dotted.key=value, e.g. optimizer.lr=1e-3")
  key, raw = text.split("=", 1)
  parts = key.strip().split(".")
  if not all(parts):
    raise ConfigError(f"override {text!r}: empty key component")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
  """A copy of `data` with the dotted overrides applied; `data` itself is
  left unchanged."""
  data = merge({}, data)
  for text in overrides:
    parts, value = parse_override(text)
    node = data
    for p in parts[:-1]:
      child = node.get(p)
      if not isinstance(child, dict):
        child = {}
        node[p] = child
      node = child
    node[parts[-1]] = value
  return data
