"""Step 6 with the value and pre-value tables in host memory
(``model.memory.table_memory: host``).

A memory layer reads S = heads * m rows of each table per token, so its
tables need not live in accelerator memory at inference: with ``host`` they
are placed in the host's ``pinned_host`` memory (parallel/host_tables.py)
and every read of them runs on the host, in a computation marked with
``jax.experimental.compute_on("device_host")``: XLA moves only that
computation's inputs and outputs between host and device. Two ways to split
the work (``model.memory.host_read``):

- ``rows``: the host gathers the kept rows, cast to the compute dtype, and
  copies them to the device, [N, S, Dv] (and [N, S, Dp] of pre-values);
  the pre-value dots and the weighted sum run on the device.
- ``sum``: the host also computes the pre-value dots, their activation and
  the weighted sum; the device sends it the indices, scores, pre-value
  inputs and block one-hots and receives o [N, E * Dv], S times fewer
  bytes than ``rows``.

Both use the same arithmetic as the device path (pallas_kernels/
reference.py: the gather, then :func:`pre_value_dot` and
:func:`weighted_rows_sum`), so on a CPU, where host and device are one
memory, the outputs are bitwise those of ``device``. Under a mesh the same
functions run per device inside the sharded read
(parallel/memory_sharding.py) on that device's host shard of the tables.

Inside a host computation every operand must be in host memory, so the
gather is written with ``lax.gather`` (``jnp.take`` adds device constants
to clamp its indices; the indices here come from top-k and are in range).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.compute_on import compute_on

from pallas_kernels.reference import ACTIVATIONS, pre_value_dot, weighted_rows_sum

HOST, DEVICE = jax.memory.Space.Host, jax.memory.Space.Device

# ``model.memory.host_read: auto``, on every backend. On the CPU the two
# were within noise of each other and of device tables at batch 1, 8 and 64
# (227M UltraMemV2, BENCHMARKS.md, decode, "Host tables"), and ``sum``
# moves 26x fewer bytes; on GPU and TPU it moves S times fewer bytes over
# the host link for the same host reads (not measured: no accelerator was
# available).
AUTO_HOST_READ = "sum"


def resolve_host_read(host_read: str) -> str:
  """``rows`` or ``sum`` for the setting (``auto``: AUTO_HOST_READ)."""
  return AUTO_HOST_READ if host_read == "auto" else host_read


def gather_rows(table: jax.Array, slots: jax.Array) -> jax.Array:
  """table[slots]: [R, D], [N, S] -> [N, S, D], with no constant operand
  (valid inside a host computation)."""
  dims = lax.GatherDimensionNumbers(offset_dims=(slots.ndim,),
                                    collapsed_slice_dims=(0,),
                                    start_index_map=(0,))
  return lax.gather(table, slots[..., None], dims, (1, table.shape[1]),
                    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _on_host(fn, *arrays):
  """fn(*arrays) as a host computation: the arrays are moved to host memory
  (the tables are there already), the result back to the device. `fn`
  closes over anything static."""
  host = compute_on("device_host")(jax.jit(fn))
  out = host(*(jax.device_put(a, HOST) for a in arrays))
  return jax.device_put(out, DEVICE)


@dataclasses.dataclass(frozen=True)
class HostRead:
  """The two halves of step 6 that touch the tables, for tables in host
  memory: ``pre_products`` (a_k = <z, P[p_k]>) and ``read`` (the weighted
  sum, with the pre-value weighting when z is given), with the signatures
  of the device path's ``pre_value_products`` and ``ValueRead.local``."""
  mode: str               # "rows" or "sum"
  activation: str
  num_blocks: int

  def pre_products(self, z: jax.Array, slots: jax.Array,
                   pre_values: jax.Array) -> jax.Array:
    if self.mode == "rows":
      rows = _on_host(functools.partial(_rows, dtype=z.dtype), pre_values, slots)
      return pre_value_dot(z, rows)
    return _on_host(_pre_value_dot_of, z, slots, pre_values)

  def read(self, slots, weights, values, blocks, z=None, pre_values=None,
           dtype=jnp.float32) -> jax.Array:
    """o [N, E * Dv_local] in `dtype`; weights [N, S, hc]."""
    act = ACTIVATIONS[self.activation]
    # Made on the device: one_hot needs constants.
    onehot = (jax.nn.one_hot(blocks, self.num_blocks, dtype=dtype)
              if self.num_blocks > 1 else None)
    if self.mode == "sum":
      fn = functools.partial(_weighted_sum, act=act, dtype=dtype,
                             with_pre=z is not None, with_blocks=onehot is not None)
      arrays = (values, slots, weights) + ((onehot,) if onehot is not None else ()) + (
          (z, pre_values) if z is not None else ())
      return _on_host(fn, *arrays)
    if z is not None:
      weights = weights * act(self.pre_products(z, slots, pre_values))[..., None]
    rows = _on_host(functools.partial(_rows, dtype=dtype), values, slots)
    return weighted_rows_sum(rows, weights, onehot=onehot, dtype=dtype)


def _rows(table, slots, *, dtype):
  """The kept rows of `table`, cast to the compute dtype (fewer bytes to
  move when it is narrower)."""
  return gather_rows(table, slots).astype(dtype)


def _pre_value_dot_of(z, slots, pre_values):
  return pre_value_dot(z, gather_rows(pre_values, slots))


def _weighted_sum(values, slots, weights, *rest, act, dtype, with_pre,
                  with_blocks):
  """All of the table-side step 6, run on the host."""
  onehot = rest[0] if with_blocks else None
  if with_pre:
    z, pre_values = rest[1:] if with_blocks else rest
    weights = weights * act(_pre_value_dot_of(z, slots, pre_values))[..., None]
  return weighted_rows_sum(_rows(values, slots, dtype=dtype), weights,
                           onehot=onehot, dtype=dtype)
