"""The per-step collectives of parameters, gradients and counters: bytes
one device sends per optimizer step (formulas in
:mod:`ultramem_jax.parallel.collective_cost`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from ultramem_jax.parallel.collective_ops import (
    INT32, all_gather, all_reduce, reduce_scatter, round_bytes)
from ultramem_jax.parallel.rules import BATCH_AXES, RULES


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """One parameter: slash-joined path, element count, bytes per element,
  logical axis names (``rules.LOGICAL_AXIS_RULES``)."""

  path: str
  size: int
  itemsize: int
  names: tuple[str | None, ...]


def param_category(p: ParamInfo) -> tuple[str, frozenset[str]]:
  """(category, mesh axes its layer reads it split over, ungathered): the
  tables inside the memory layer's shard_map, the experts inside the
  expert-parallel shard_map, anything else tensor-parallel."""
  leaf = p.path.rsplit("/", 1)[-1]
  if leaf in ("values", "pre_values"):
    return "memory tables", frozenset({"memory"})
  if "expert" in p.names:
    return "MoE experts", frozenset({"expert"})
  return "other parameters", frozenset({"tensor"})


def mesh_axes(names: Sequence[str | None]) -> list[str]:
  """Mesh axes sharding some dimension of an array with these names."""
  axes = []
  for name in names:
    rule = RULES.get(name) if name is not None else None
    if rule is not None:
      axes += [rule] if isinstance(rule, str) else list(rule)
  return axes


def param_step_ops(params: Iterable[ParamInfo], sizes: dict[str, int]) -> list[dict]:
  """Per-step parameter all-gathers, gradient reduce-scatters and gradient
  all-reduces (module docstring), summed by (op, axes, category); bytes are
  what one device sends per step."""
  batch = [a for a in BATCH_AXES if sizes.get(a, 1) > 1]
  rows: dict[tuple, list[float]] = {}

  def add(op, what, axes, category, param_bytes, sent):
    group = math.prod(sizes[a] for a in axes)
    key = (op, what, tuple(axes), group, category)
    acc = rows.setdefault(key, [0.0, 0.0])
    acc[0] += param_bytes
    acc[1] += sent

  for p in params:
    category, in_place = param_category(p)
    full = p.size * p.itemsize
    sharded = [a for a in mesh_axes(p.names) if sizes.get(a, 1) > 1]
    kept = [a for a in sharded if a in in_place]
    gathered = [a for a in sharded if a not in kept]
    used = full / math.prod(sizes[a] for a in kept)    # bytes after the gather
    if gathered:
      a = math.prod(sizes[x] for x in gathered)
      add("all-gather", "parameters before use", gathered, category, full,
          all_gather(used, a))
      add("reduce-scatter", "gradients", gathered, category, full,
          reduce_scatter(used, a))
    replicated = [x for x in batch if x not in sharded]
    if replicated:
      r = math.prod(sizes[x] for x in replicated)
      shard = full / math.prod(sizes[x] for x in sharded)
      add("all-reduce", "gradients", replicated, category, full,
          all_reduce(shard, r))
  return [{"op": op, "what": f"{what}: {category}", "axes": list(axes),
           "group": group, "param_bytes": round_bytes(pb),
           "bytes_per_device": round_bytes(sent), "approximate": True}
          for (op, what, axes, group, category), (pb, sent) in sorted(rows.items())]


def counter_step_ops(*, memory_rows: Sequence[int], moe_experts: Sequence[int],
                     sizes: dict[str, int]) -> list[dict]:
  """Per step: all-reduce (max) of each memory layer's slot-use stamps
  [rows] int32 over the batch axes; per MoE layer, all-gather of the per-
  expert counts [E] int32 over ``expert`` and all-reduce of the router
  statistics ([E] int32 counts, [E] float32 mean probabilities) over the
  batch axes."""
  out = []
  batch = [a for a in BATCH_AXES if sizes.get(a, 1) > 1]
  g = math.prod(sizes[a] for a in batch)
  if memory_rows and g > 1:
    out.append({"op": "all-reduce", "what": "memory slot-use stamps [rows] int32 "
                f"(max), {len(memory_rows)} layers", "axes": batch, "group": g,
                "bytes_per_device": round_bytes(
                    sum(all_reduce(INT32 * r, g) for r in memory_rows))})
  if moe_experts and g > 1:
    out.append({"op": "all-reduce", "what": "router statistics [E] int32 + [E] "
                f"float32, {len(moe_experts)} layers", "axes": batch, "group": g,
                "bytes_per_device": round_bytes(
                    sum(all_reduce(8 * e, g) for e in moe_experts))})
  x = sizes.get("expert", 1)
  if moe_experts and x > 1:
    out.append({"op": "all-gather", "what": "per-expert counts [E] int32, "
                f"{len(moe_experts)} layers", "axes": ["expert"], "group": x,
                "bytes_per_device": round_bytes(
                    sum(all_gather(x * INT32 * e, x) for e in moe_experts))})
  return out
