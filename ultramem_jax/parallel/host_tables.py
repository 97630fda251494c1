"""Value and pre-value tables placed in host memory
(``model.memory.table_memory: host``; the read is model/memory/host_read.py).

A table's host placement keeps its device sharding and changes only the
memory kind (``pinned_host``): under a mesh each device's shard, the same
column or row split as on the devices (``model.memory.table_sharding``),
lives in its own host's memory, so each process holds the shards of its
own devices. A table replicated over devices (a mesh without a ``memory``
axis) is held once per device, as it would be in device memory.

Tables are recognised by path: a ``values`` or ``pre_values`` leaf under a
``table`` (each layer's ``memory/table``, or the shared ``memory_table``),
in the model and in the optimizer's moments of it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding

HOST_KIND = "pinned_host"
TABLE_LEAVES = ("values", "pre_values")


def _names(path) -> list[str]:
  out = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    out.append(str(name))
  if out and out[-1] == "value":   # an nnx.Variable's own leaf
    out = out[:-1]
  return out


def is_table_path(path) -> bool:
  """Whether a tree path (of ``jax.tree_util`` keys) names a table leaf."""
  names = _names(path)
  return (len(names) >= 2 and names[-1] in TABLE_LEAVES
          and "table" in names[-2])


def memory_kinds(device: jax.Device) -> set[str]:
  """The memory kinds `device` can address (``device``, ``pinned_host``,
  ...); empty for a backend that does not say."""
  try:
    return {m.kind for m in device.addressable_memories()}
  except Exception:  # noqa: BLE001 (a backend without memories)
    return set()


def devices_without_host_memory(devices) -> list[jax.Device]:
  return [d for d in devices if HOST_KIND not in memory_kinds(d)]


def host_target(abstract_state: Any, mesh) -> Any:
  """ShapeDtypeStructs of `abstract_state` (shapes, dtypes and shardings
  over `mesh`, as ``nnx.eval_shape`` gives them) with the tables' shardings
  in host memory: the target to restore a checkpoint straight into."""
  def place(path, x):
    spec = x.sharding.spec
    kind = HOST_KIND if is_table_path(path) else "device"
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, spec, memory_kind=kind))
  return jax.tree_util.tree_map_with_path(place, abstract_state)


def tables_to_host(state: Any) -> Any:
  """`state` with its table arrays moved to host memory (same sharding);
  the device copies are freed once nothing else holds them."""
  def move(path, x):
    if not (is_table_path(path) and isinstance(x, jax.Array)):
      return x
    return jax.device_put(x, x.sharding.with_memory_kind(HOST_KIND))
  return jax.tree_util.tree_map_with_path(move, state)


def local_devices(mesh) -> list[jax.Device]:
  """The devices of `mesh` this process drives."""
  return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def on_host(x: jax.Array) -> bool:
  """Whether array `x` lives in host memory."""
  return getattr(x.sharding, "memory_kind", None) == HOST_KIND


def host_table_bytes(abstract_state: Any, mesh) -> int:
  """Bytes of host memory this process needs for the tables of
  `abstract_state` placed by :func:`host_target`: one shard per local
  device of the mesh."""
  local = len(local_devices(mesh))
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    if is_table_path(path):
      shard = NamedSharding(mesh, x.sharding.spec).shard_shape(x.shape)
      total += local * math.prod(shard) * x.dtype.itemsize
  return total
