"""The task registry and the mixture spec of ``data.tasks``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ultramem_jax.config import ConfigError
from ultramem_jax.tasks.base import Task
from ultramem_jax.tasks.fact_retrieval import FactRetrieval
from ultramem_jax.tasks.mqar import MQAR
from ultramem_jax.tasks.mqar_overwrite import MQAROverwrite
from ultramem_jax.tasks.niah import NIAH
from ultramem_jax.tasks.space import TaskError
from ultramem_jax.tasks.token_mapping import TokenMapping

TASKS: dict[str, type[Task]] = {
    "niah": NIAH,
    "mqar": MQAR,
    "mqar_overwrite": MQAROverwrite,
    "token_mapping": TokenMapping,
    "fact_retrieval": FactRetrieval,
}


def get_task(name: str, **params: Any) -> Task:
  """The task `name` with its parameters overridden by `params`.

  Lists (as YAML gives them) become tuples, so ``num_pairs: [4, 16]`` is a
  range. Raises TaskError naming an unknown task or parameter.
  """
  if name not in TASKS:
    raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
  cls = TASKS[name]
  fields = [f.name for f in dataclasses.fields(cls)]
  for key in params:
    if key not in fields:
      raise TaskError(f"{name}.{key}: unknown parameter; {name} takes "
                      f"{', '.join(fields)}")
  params = {k: tuple(v) if isinstance(v, list) else v
            for k, v in params.items()}
  return cls(**params)


def parse_mixture(spec: str | Mapping[str, Any], key: str = "data.tasks",
                  extra: tuple[str, ...] = ()) -> dict[str, float]:
  """Parses ``"mqar:1,niah:0.5"`` (or a mapping) to ``{name: weight}``.

  An entry without a weight weighs 1. Names must be registered tasks or in
  `extra` (e.g. ``("text",)`` for a mixture with the text corpus); weights
  must be finite and positive; a name may appear once. Raises ConfigError
  naming `key` and the bad entry.
  """
  known = tuple(TASKS) + tuple(extra)
  example = "expected entries like 'mqar:1,niah:0.5'"
  if isinstance(spec, Mapping):
    entries = [(str(n), w, f"{n}: {w}") for n, w in spec.items()]
  elif isinstance(spec, str):
    entries = []
    for raw in spec.split(","):
      entry = raw.strip()
      if not entry:
        raise ConfigError(f"{key}={spec!r}: an empty entry; {example}")
      name, sep, weight = entry.partition(":")
      entries.append((name.strip(), weight.strip() if sep else 1.0, entry))
  else:
    raise ConfigError(f"{key}={spec!r}: {example}")
  if not entries:
    raise ConfigError(f"{key}={spec!r}: no tasks; {example}")
  out: dict[str, float] = {}
  for name, weight, entry in entries:
    if name not in known:
      raise ConfigError(f"{key}: entry {entry!r}: unknown task {name!r}; "
                        f"known: {', '.join(known)}")
    if name in out:
      raise ConfigError(f"{key}: entry {entry!r}: task {name!r} appears twice")
    try:
      w = float(weight)
    except (TypeError, ValueError):
      raise ConfigError(f"{key}: entry {entry!r}: weight {weight!r} is not a "
                        "number") from None
    if not math.isfinite(w) or w <= 0:
      raise ConfigError(f"{key}: entry {entry!r}: weight {weight!r} must be "
                        "a positive number")
    out[name] = w
  return out
