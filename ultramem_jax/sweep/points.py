"""A sweep's points: the expansion of its axes, each point's config
(validated as train.py would), its stable name and its run directory.

Expansion: the product of the zip groups (each group's keys move together)
and the grid keys, in the file's order, with the seeds innermost; the
first axis varies slowest. A point's settings are the shared overrides
followed by its axis values and its seed.

Name: ``<variant>-<axis values>-s<seed>-<hash>``, for example
``moe-lr0.001-s0-1f3a9c2e``. The variant is the ``variant`` axis, else the
stem of the point's base config; the axis values are the last component of
each varying key (other than ``config``, ``variant`` and the seed) glued to
its value; the hash is the first 8 hex digits of the SHA-256 of the point's
resolved config (every section, as JSON with sorted keys) less the keys that
do not change what is trained (:data:`UNHASHED`). So a change to a point's
settings, or to its base config file, gives a new name and a new run
directory, and an override that restates a default does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib
import re
from typing import Any

import yaml

from ultramem_jax.config import ConfigError, parse_override, to_dict
from ultramem_jax.sweep.spec import (CONFIG_KEY, SEED_KEY, VARIANT_KEY, Sweep,
                                     config_path)
from ultramem_jax.training.config import Config, load_config

# Keys left out of a point's hash: where the run goes and how it is shown.
UNHASHED = (("train", "run_dir"), ("train", "progress_bar"))
HASH_DIGITS = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9._+]+")


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    name: the stable name (module docstring), also its directory's name.
    variant: the label the report groups by.
    seed: train.seed.
    settings: (key, value) of the axes that vary, besides config, variant
      and seed, in axis order.
    config: the base config file.
    overrides: train.py's dotted overrides, but for train.run_dir.
    cfg: the validated config (what train.py will run).
  """

  name: str
  variant: str
  seed: int
  settings: tuple[tuple[str, Any], ...]
  config: pathlib.Path
  overrides: tuple[str, ...]
  cfg: Config

  @property
  def run_dir(self) -> pathlib.Path:
    return pathlib.Path(self.cfg.train.run_dir)

  @property
  def steps(self) -> int:
    return self.cfg.train.steps

  @property
  def group(self) -> str:
    """The point's name without seed and hash: the points that differ only
    in their seed share it (the report's rows)."""
    return "-".join([self.variant] + [_short(k, v) for k, v in self.settings])


def override_text(key: str, value: Any) -> str:
  """``key=value`` as train.py parses it (the value read back as YAML)."""
  if isinstance(value, str):
    try:
      plain = yaml.safe_load(value) == value and "\n" not in value
    except yaml.YAMLError:
      plain = False
    text = value if plain else json.dumps(value)
  else:
    text = json.dumps(value)
  return f"{key}={text}"


def expand(sweep: Sweep) -> list[dict[str, Any]]:
  """Every point's axis values, key -> value in axis order, `config`,
  `variant` and train.seed included where the sweep sets them."""
  axes: list[list[dict[str, Any]]] = []
  for group in sweep.zip:
    keys = list(group)
    axes.append([dict(zip(keys, values)) for values in zip(*group.values())])
  for key, values in sweep.grid.items():
    axes.append([{key: v} for v in values])
  if sweep.seeds is not None:
    axes.append([{SEED_KEY: s} for s in sweep.seeds])
  points = []
  for combo in itertools.product(*axes):
    values: dict[str, Any] = {}
    for part in combo:
      values.update(part)
    points.append(values)
  return points


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (str, int)):
    return str(value)
  return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _short(key: str, value: Any) -> str:
  return _UNSAFE.sub("_", key.rsplit(".", 1)[-1] + _format(value)).strip("_")


def config_hash(cfg: Config) -> str:
  """The first HASH_DIGITS hex digits of the SHA-256 of the resolved config
  as JSON (sorted keys), less the UNHASHED keys."""
  data = to_dict(cfg)
  for section, key in UNHASHED:
    data[section].pop(key, None)
  text = json.dumps(data, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:HASH_DIGITS]


def point_name(variant: str, settings: tuple[tuple[str, Any], ...], seed: int,
               digest: str) -> str:
  parts = [_UNSAFE.sub("_", variant).strip("_") or "point"]
  parts += [_short(k, v) for k, v in settings]
  return "-".join(parts + [f"s{seed}", digest])


def with_overrides(sweep: Sweep, texts: list[str] | tuple[str, ...]) -> Sweep:
  """The sweep with command-line ``key=value`` overrides added to its
  shared ones; a key that is an axis of the sweep is refused."""
  extra = {}
  axes = set(sweep.grid) | {k for g in sweep.zip for k in g}
  if sweep.seeds is not None:
    axes.add(SEED_KEY)
  for text in texts:
    parts, value = parse_override(text)
    key = ".".join(parts)
    if key in axes:
      raise ConfigError(f"override {text!r}: {key} is an axis of the sweep "
                        f"{str(sweep.path)!r}; change it there")
    extra[key] = value
  return dataclasses.replace(sweep, overrides={**sweep.overrides, **extra})


def _point(sweep: Sweep, index: int, values: dict[str, Any]) -> Point:
  config = values.get(CONFIG_KEY, sweep.config)
  if not isinstance(config, str):
    raise ConfigError(f"point {index}: config: got {config!r}; expected a "
                      "config file path")
  path = config_path(sweep, config)
  variant = str(values.get(VARIANT_KEY, path.stem))
  settings = tuple((k, v) for k, v in values.items()
                   if k not in (CONFIG_KEY, VARIANT_KEY, SEED_KEY))
  overrides = [override_text(k, v) for k, v in sweep.overrides.items()]
  overrides += [override_text(k, v) for k, v in values.items()
                if k not in (CONFIG_KEY, VARIANT_KEY)]
  readable = "-".join([variant] + [_short(k, v) for k, v in settings])
  try:
    cfg = load_config(path, overrides)
  except ConfigError as e:
    raise ConfigError(f"point {index} ({readable}, config {str(path)!r}): {e}"
                      ) from None
  name = point_name(variant, settings, cfg.train.seed, config_hash(cfg))
  run_dir = sweep.sweep_dir / name
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, run_dir=str(run_dir)))
  return Point(name=name, variant=variant, seed=cfg.train.seed,
               settings=settings, config=path, overrides=tuple(overrides),
               cfg=cfg)


def resolve(sweep: Sweep) -> list[Point]:
  """Every point of the sweep, each config validated as train.py would; a
  ConfigError naming the first invalid point (its index, settings and
  config) and the key, before anything is run or written. Two points that
  resolve to the same config are refused too."""
  points = [_point(sweep, i, values) for i, values in enumerate(expand(sweep))]
  seen: dict[str, int] = {}
  for i, p in enumerate(points):
    if p.name in seen:
      raise ConfigError(f"points {seen[p.name]} and {i} resolve to the same "
                        f"config and name {p.name!r}; drop one")
    seen[p.name] = i
  return points
