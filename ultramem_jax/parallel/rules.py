"""The one table mapping logical axis names to mesh axes.

Every parameter is created with logical names (``nnx.with_partitioning``);
activations are constrained with the same names. Only this table says which
mesh axis, if any, shards each of them, in the style of MaxText's
``logical_axis_rules``.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
from jax.sharding import PartitionSpec

# Mesh axes the batch is split over. The expert and memory groups also split
# the batch (as MaxText's expert axis does), so no device repeats another's
# attention or dense work; their layers gather what they need explicitly.
BATCH_AXES = ("data", "fsdp", "expert", "memory")


def batch_shards(sizes: Mapping[str, int]) -> int:
  """How many parts the batch is split into: the product of the sizes of the
  batch axes in `sizes` (a mesh's ``shape`` or a name -> size mapping); axes
  it does not name count as 1."""
  return math.prod(sizes.get(a, 1) for a in BATCH_AXES)

# (logical name, mesh axis or tuple of mesh axes or None)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
    # parameters
    # model.scan_layers: the leading axis of the stacked blocks' variables
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("expert", "expert"),
    ("router_logits", None),
    # memory layers: value tables are column-sharded over `memory` (spec
    # section 5); rows, keys and the small projections' memory side are not
    ("memory_rows", None),
    ("memory_value", "memory"),
    # model.memory.table_sharding=row: tables hold R/M rows of full width
    ("memory_row_shards", "memory"),
    ("memory_columns", None),
    ("memory_heads", None),
    ("memory_keys", None),
    ("memory_key_dim", None),
    ("memory_rank", None),
    ("memory_slots", None),
)

RULES = dict(LOGICAL_AXIS_RULES)


def logical_to_mesh(names: tuple[str | None, ...]) -> PartitionSpec:
  """PartitionSpec for an array whose axes carry these logical names."""
  unknown = [n for n in names if n is not None and n not in RULES]
  if unknown:
    raise KeyError(f"logical axis names {unknown} have no rule in "
                   "ultramem_jax.parallel.rules.LOGICAL_AXIS_RULES")
  return PartitionSpec(*(RULES[n] if n is not None else None for n in names))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(names))
