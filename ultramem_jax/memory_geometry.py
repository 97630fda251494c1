"""Where the memory layers sit and the sizes they derive from the config.

Plain Python (no JAX), so config validation, the model and ``inspect`` all
read the same numbers. Symbols follow the spec: ``n`` keys per side of one
value block, ``E`` implicit value expansion, ``X`` key expansion, ``L_mem``
memory layers.
"""

from __future__ import annotations

import dataclasses
import math


class PlacementError(ValueError):
  """``model.memory.layers`` cannot be parsed or names blocks that don't exist."""


def parse_placement(text: str | int, n_layers: int) -> list[tuple[int, int]]:
  """``model.memory.layers`` as (source block, destination block) pairs.

  ``""``: none. ``"all"``: every block, (i, i). ``"1,3"``: those blocks.
  ``"2:5/6:9"``: skip layers reading block 2's normalised FFN input and
  adding their output after block 5 (UltraMem v1). Pairs are sorted by
  source block; a block is the source of at most one memory layer.
  """
  text = str(text).strip()
  if not text:
    return []
  if text == "all":
    return [(i, i) for i in range(n_layers)]
  pairs = []
  for part in text.replace("/", ",").split(","):
    part = part.strip()
    try:
      if ":" in part:
        src, dst = (int(x) for x in part.split(":"))
      else:
        src = dst = int(part)
    except ValueError:
      raise PlacementError(
          f"{part!r} is not a block index or a 'source:destination' pair; "
          "expected e.g. 'all', '1,3' or '2:5/6:9'") from None
    if not 0 <= src <= dst < n_layers:
      raise PlacementError(
          f"{part!r}: blocks must satisfy 0 <= source <= destination < "
          f"n_layers={n_layers}")
    pairs.append((src, dst))
  sources = [s for s, _ in pairs]
  if len(set(sources)) != len(sources):
    raise PlacementError(f"{text!r}: a block reads into at most one memory layer")
  return sorted(pairs)


@dataclasses.dataclass(frozen=True)
class MemoryGeometry:
  placement: tuple[tuple[int, int], ...]
  keys_per_side: int   # ns: X * sqrt(E) * n, or X * floor(sqrt(share_ratio * rows)) when shared
  rows_per_block: int  # R: n*n, or the window a layer addresses when shared
  table_rows: int      # rows of one layer's table, or of the shared table
  blocks: int          # E
  block_offsets: tuple[int, ...]  # first row of each layer's window (shared)
  key_expansion: int = 1          # X: X*X virtual slots fold onto each row

  @property
  def block_slots(self) -> int:
    """Virtual slots of one value block: X*X*R (the slot permutation's
    values q give the block q div X*X*R)."""
    return self.key_expansion ** 2 * self.rows_per_block

  @property
  def num_layers(self) -> int:
    return len(self.placement)

  @property
  def virtual_slots(self) -> int:
    return self.keys_per_side ** 2


def memory_geometry(model_cfg) -> MemoryGeometry:
  """Sizes of the memory layers of a ``ModelConfig`` (see ``MemoryConfig``)."""
  mem = model_cfg.memory
  placement = tuple(parse_placement(mem.layers, model_cfg.n_layers))
  n, e, x = mem.n_keys, mem.value_expansion, mem.key_expansion
  if mem.share_values:
    base_rows = n * n
    table_rows = base_rows * max(1, len(placement))
    ns = math.isqrt(int(mem.share_ratio * table_rows))
    offsets = tuple((l * base_rows) % table_rows for l in range(len(placement)))
    return MemoryGeometry(placement, x * ns, ns * ns, table_rows, 1, offsets, x)
  kt = math.isqrt(e)
  return MemoryGeometry(placement, x * kt * n, n * n, n * n, e,
                        tuple(0 for _ in placement), x)
