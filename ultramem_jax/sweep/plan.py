"""``plan``: every point with its counts from ``inspect`` (activated and
total parameters, forward FLOPs per token) and the tokens and training
FLOPs of its run, and where it stands.

Training FLOPs are ``3 x flops_per_token x tokens``: the forward pass and a
backward pass of twice its cost, over ``train.steps x data.batch_size x
data.seq_len`` tokens (inspect's conventions: 2 FLOPs per multiply-add,
attention over the full context).
"""

from __future__ import annotations

import json

from ultramem_jax.config import to_dict
from ultramem_jax.inspect import inspect_config
from ultramem_jax.sweep.points import Point

COLUMNS = ("point", "state", "activated_params", "total_params",
           "flops_per_token", "tokens", "train_flops")


def tokens(point: Point) -> int:
  d = point.cfg.data
  return point.steps * d.batch_size * d.seq_len


def counts(points: list[Point], devices: int | None = None) -> dict[str, dict]:
  """{point name: counts}; inspect runs once per distinct model, data and
  mesh (seeds share it)."""
  cache: dict[str, dict] = {}
  out = {}
  for p in points:
    d = to_dict(p.cfg)
    key = json.dumps({k: d[k] for k in ("model", "data", "mesh")}, sort_keys=True)
    if key not in cache:
      info = inspect_config(p.cfg, devices=devices, batches=(1,))
      cache[key] = {k: info[k] for k in
                    ("activated_params", "total_params", "non_embedding_params",
                     "activated_non_embedding_params", "flops_per_token")}
    c = dict(cache[key])
    c["tokens"] = tokens(p)
    c["train_flops"] = 3 * c["flops_per_token"] * c["tokens"]
    out[p.name] = c
  return out


def human(x: float) -> str:
  """1234567 -> '1.23M' (k, M, G, T, P)."""
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:g}"


def table(points: list[Point], counted: dict[str, dict],
          states: dict[str, str]) -> str:
  """The plan as a fixed-width table, one point a line."""
  rows = [COLUMNS]
  for p in points:
    c = counted[p.name]
    rows.append((p.name, states.get(p.name, "pending"),
                 f"{c['activated_params']:,}", f"{c['total_params']:,}",
                 human(c["flops_per_token"]), human(c["tokens"]),
                 human(c["train_flops"])))
  widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
  return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(r, widths)))
                   for r in rows)
