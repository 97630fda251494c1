"""Scanned layers (``model.scan_layers``): the blocks' parameters stacked on
a leading ``layers`` axis and run by one ``nnx.scan``, so the compiled
program holds one block whatever ``model.n_layers`` is.

The stacked block is built from the unrolled ones (:func:`stack_modules`),
so a seed gives the same model either way and tests can copy an unrolled
model into the stacked layout. Every variable of the stacked block keeps
its logical axis names behind ``layers``, which the rules table maps to no
mesh axis. What a block sows (auxiliary losses, per-layer metrics) comes
out of the scan stacked; :func:`resow_per_layer` sows it again under each
layer's unrolled path (``blocks/3/ffn/expert_load``), so the train step,
the logs and TensorBoard see the same keys as an unrolled run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.model.kv_cache import LayerCache
from ultramem_jax.model.remat import remat

LAYERS_AXIS = "layers"


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _stack_vars(*vs: nnx.Variable) -> nnx.Variable:
  """One variable holding `vs` stacked on a new axis 0, ``layers`` prepended
  to its logical names (placed on the mesh, if any, as they say)."""
  meta = dict(vs[0].get_metadata())
  if meta.get("out_sharding") is not None:
    meta["out_sharding"] = (LAYERS_AXIS,) + tuple(meta["out_sharding"])
  return type(vs[0])(jnp.stack([v[...] for v in vs]), **meta)


def _unstack_var(v: nnx.Variable, i: int) -> nnx.Variable:
  meta = dict(v.get_metadata())
  names = meta.get("out_sharding")
  if names is not None and tuple(names)[:1] == (LAYERS_AXIS,):
    meta["out_sharding"] = tuple(names)[1:]
  return type(v)(v[...][i], **meta)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """A module of `modules[0]`'s structure whose every variable stacks the
  modules' values on a leading ``layers`` axis. The modules must have the
  same structure and static attributes (``model.scan_layers`` is refused
  at config validation for blocks that differ)."""
  graphdef = nnx.graphdef(modules[0])
  states = [nnx.state(m) for m in modules]
  stacked = jax.tree.map(_stack_vars, *states, is_leaf=_is_var)
  return nnx.merge(graphdef, stacked)


def unstack_module(stacked: nnx.Module) -> list[nnx.Module]:
  """The inverse of :func:`stack_modules`: one module per layer."""
  graphdef, state = nnx.split(stacked)
  n = stacked_layers(stacked)
  return [nnx.merge(graphdef, jax.tree.map(lambda v: _unstack_var(v, i), state,
                                           is_leaf=_is_var))
          for i in range(n)]


def stacked_layers(stacked: nnx.Module) -> int:
  """The length of the leading ``layers`` axis of a stacked module."""
  leaves = jax.tree.leaves(nnx.state(stacked, nnx.Param))
  return int(leaves[0].shape[0])


def scan_blocks(blocks: nnx.Module, x: jax.Array, positions: jax.Array,
                policy: str) -> jax.Array:
  """x through every layer of the stacked `blocks` (each under the
  ``model.remat`` `policy`); what the layers sow comes out stacked."""
  call = remat(lambda block, x, positions: block(x, positions)[0], policy)

  @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
  def body(block, x, positions):
    return call(block, x, positions)

  return body(blocks, x, positions)


def scan_extend(blocks: nnx.Module, x: jax.Array, positions: jax.Array,
                layers: tuple[LayerCache, ...], length: jax.Array,
                visible: jax.Array) -> tuple[jax.Array, list[LayerCache]]:
  """Generation through the stacked `blocks`: every layer's cache is
  stacked, scanned with its layer and unstacked again."""
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

  @nnx.scan(in_axes=(0, nnx.Carry, 0, None, None, None),
            out_axes=(nnx.Carry, 0))
  def body(block, x, cache, positions, length, visible):
    x, _, cache = block.extend_layer(x, positions, cache, length, visible)
    return x, cache

  x, caches = body(blocks, x, stacked, positions, length, visible)
  n = len(layers)
  return x, [jax.tree.map(lambda a: a[i], caches) for i in range(n)]


def layer_path(container: str, i: int, rest: tuple) -> str:
  """The unrolled path of layer `i`'s entry `rest` under `container`."""
  return "/".join([container, str(i), *map(str, rest)])


def split_layer_path(path: str) -> tuple[str, int, tuple] | None:
  """The inverse of :func:`layer_path`: (container, layer, rest) of an
  unrolled path such as ``blocks/3/ffn/load_balance_fraction`` (list
  indices in `rest` as ints), or None for a name that is not one."""
  parts = path.split("/")
  if len(parts) < 3 or not parts[1].isdigit():
    return None
  rest = tuple(int(r) if r.isdigit() else r for r in parts[2:])
  return parts[0], int(parts[1]), rest


def resow_per_layer(owner: nnx.Module, container: str) -> None:
  """Moves what the stacked ``owner.<container>`` sowed (each value [L, ...])
  onto `owner`, one entry per layer under the unrolled path, e.g.
  ``blocks/3/ffn/load_balance`` (the attribute's name holds the path, so
  ``"/".join(path)`` of the popped state reads as an unrolled run's)."""
  stacked = getattr(owner, container)
  for path, var in nnx.to_flat_state(nnx.pop(stacked, nnx.Intermediate)):
    values = var.get_value()
    total = sum(values[1:], values[0])
    for i in range(total.shape[0]):
      owner.sow(type(var), layer_path(container, i, path), total[i])
