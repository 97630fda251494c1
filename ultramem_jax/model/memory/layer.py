"""The memory layer module: the stages of spec section 2, steps 1-7, run in
order. UltraMemV2, UltraMem v1, Memory+, PKM and PEER are recipes of stages
(``recipe.py`` builds one from ``model.memory``; ``stages.py`` and
``readout.py`` hold the stages), not branches of one forward pass.

State that is not trained lives in two variable kinds, saved in checkpoints
with the parameters but never touched by the optimizer:

- :class:`MemoryBuffer`: the slot permutation pi and the Tucker vectors
  u, v (refreshed once per optimizer step by :func:`refresh_memory`);
- :class:`MemoryStat`: the step at which each row was last read, from which
  the train step reports slot utilisation over a window.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model.common import dtype_of, normal_param
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.memory import retrieval as R
from ultramem_jax.model.memory.host_read import HostRead, resolve_host_read
from ultramem_jax.model.memory.recipe import memory_recipe
from ultramem_jax.model.scan import layer_path
# MemoryBuffer is re-exported (model.memory imports it from here).
from ultramem_jax.model.memory.stages import MemoryBuffer, Sizes  # noqa: F401

# Stamp of a row never read (far outside any window).
_NEVER = -(2 ** 30)


def use_pallas(kernels: str) -> tuple[bool, bool]:
  """``model.memory.kernels`` -> (use the Pallas kernels, interpret them).
  ``auto`` picks Pallas on TPU and GPU; ``pallas`` on a CPU interprets."""
  accelerator = jax.default_backend() in ("tpu", "gpu")
  if kernels == "xla" or (kernels == "auto" and not accelerator):
    return False, False
  return True, not accelerator


def host_reader(cfg: ModelConfig, recipe) -> HostRead | None:
  """The host read of ``model.memory.table_memory: host`` (None: tables on
  the device)."""
  mem = cfg.memory
  if mem.table_memory != "host":
    return None
  return HostRead(resolve_host_read(mem.host_read), recipe.read.activation,
                  recipe.read.blocks)


class MemoryStat(nnx.Variable):
  """Running statistics kept for logging only."""


def initial_value_std(cfg: ModelConfig, sigma_s2: float | jax.Array = 0.0):
  """Std of values and pre-values (spec, Initialisation; section 6).

  eq26: sigma_V**4 = 0.2 k_inner d / (m heads (1 + sigma_s2) Dp Dv L);
  ultramem: sigma_V**2 = E / (2 m heads L); fixed (and the released-code
  path): value_init_std. L is the number of memory layers.
  """
  mem = cfg.memory
  if mem.init == "released" or mem.value_init == "fixed":
    return mem.value_init_std
  layers = memory_geometry(cfg).num_layers
  if mem.value_init == "ultramem":
    return math.sqrt(mem.value_expansion / (2 * mem.top_m * mem.heads * layers))
  k_inner = cfg.ffn_inner_dim / cfg.d_model
  var2 = (0.2 * k_inner * cfg.d_model
          / (mem.top_m * mem.heads * (1.0 + sigma_s2) * mem.pre_value_dim
             * cfg.value_dim * layers))
  return var2 ** 0.25


class MemoryTable(nnx.Module):
  """Values V [rows, Dv] and pre-values P [rows, Dp], labelled ``values``
  for the optimizer (their own learning-rate multiplier)."""

  def __init__(self, cfg: ModelConfig, rows: int, *, rngs: nnx.Rngs):
    mem, pdt = cfg.memory, dtype_of(cfg.param_dtype)
    std = initial_value_std(cfg)
    names = (("memory_rows", "memory_value") if mem.table_sharding == "column"
             else ("memory_row_shards", "memory_columns"))
    self.values = normal_param(rngs, std, (rows, cfg.value_dim), names, pdt,
                               param_group="values")
    self.pre_values = (normal_param(rngs, std, (rows, mem.pre_value_dim),
                                    names, pdt, param_group="values")
                       if mem.pre_value_dim else None)


class MemoryLayer(nnx.Module):
  """Mem(h) for the block's normalised input h [..., d] (steps 1-7): the
  stages of ``self.recipe`` (see stages.py, readout.py and recipe.py) run in
  order. The variables each stage creates are attributes of the layer under
  their usual names (w_q, keys, cores, u, v, perm, w_p, w_g, w_o; the table)."""

  def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs,
               own_table: bool = True):
    self.recipe = recipe = memory_recipe(cfg)
    self._geometry(cfg, index)
    self.use_pallas, self.interpret = use_pallas(cfg.memory.kernels)
    self.host_read = host_reader(cfg, self.recipe)
    sizes = Sizes(cfg.d_model, self.keys_per_side,
                  self.num_blocks * self.value_dim, dtype_of(cfg.param_dtype))
    for stage in (recipe.retrieval, recipe.read, recipe.output):
      for name, var in stage.create(rngs, sizes).items():
        setattr(self, name, var)
    self.table = MemoryTable(cfg, self.table_rows, rngs=rngs) if own_table else None
    # Logging state: the call at which each window row was last read.
    self.calls = MemoryStat(jnp.zeros((), jnp.int32), out_sharding=())
    self.last_used = MemoryStat(
        jnp.full((self.rows_per_block,), _NEVER, jnp.int32),
        out_sharding=("memory_rows",))

  def _geometry(self, cfg: ModelConfig, index: int) -> None:
    """Sizes and addressing the stages read from the layer."""
    geo = memory_geometry(cfg)
    self.dtype = dtype_of(cfg.dtype)
    self.index, self.d_model, self.eps = index, cfg.d_model, cfg.norm_eps
    self.heads, self.top_m = self.recipe.retrieval.heads, self.recipe.retrieval.top_m
    self.tucker = self.recipe.retrieval.tucker
    self.keys_per_side, self.rows_per_block = geo.keys_per_side, geo.rows_per_block
    self.block_slots = geo.block_slots
    self.num_blocks, self.value_dim = geo.blocks, cfg.value_dim
    self.pre_value_dim = self.recipe.read.pre_value_dim
    self.offset, self.table_rows = geo.block_offsets[index], geo.table_rows

  # ------------------------------------------------------------------ counts

  def activated_param_count(self) -> int:
    """Parameters one token touches: everything but the tables (all keys
    are scored), plus heads * m rows of Dv + Dp."""
    own = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
    if self.table is not None:
      own -= sum(x.size for x in jax.tree.leaves(nnx.state(self.table, nnx.Param)))
    return own + self.heads * self.top_m * (self.value_dim + self.pre_value_dim)

  def flops_per_token(self) -> int:
    """Forward FLOPs, 2 per multiply-add (spec section 2's operation counts),
    the sum of the stages' counts."""
    r = self.recipe
    return 2 * (r.retrieval.flops(self) + r.read.flops(self, self.heads * self.top_m)
                + r.output.flops(self))

  # --------------------------------------------------------------- forward

  def retrieve(self, x: jax.Array) -> tuple[R.Retrieved, dict]:
    """Steps 1-4 for tokens x [N, d]; also returns the pre-filter scores
    and picks (for the key-balance loss; the scores only when it is on)."""
    return self.recipe.retrieval.retrieve(self, x)

  def __call__(self, h: jax.Array, shared_table: MemoryTable | None = None) -> jax.Array:
    shape, dt, r = h.shape, self.dtype, self.recipe
    x = h.reshape(-1, shape[-1]).astype(dt)
    n = x.shape[0]
    table = self.table if self.table is not None else shared_table
    if table is None:
      raise ValueError("this memory layer reads a shared table; pass it")
    kept, pre = r.retrieval.retrieve(self, x)                  # steps 1-4
    slots, blocks, local = r.retrieval.addresses(self, kept)   # step 5
    # 6. The weights per core chunk, then the weighted read.
    w = r.weighting(kept.core_scores).reshape(n, self.heads * self.top_m, -1)
    slots = slots.reshape(n, self.heads * self.top_m)
    blocks = blocks.reshape(n, self.heads * self.top_m)
    o = r.read(self, x, slots, w, blocks, table)
    y = r.output(self, x, o)                                   # step 7
    self._observe(kept, pre, local)
    return y.reshape(shape).astype(dt)

  def _observe(self, kept: R.Retrieved, pre: dict, local: jax.Array) -> None:
    """Optional losses, logged metrics and the slot-use stamps."""
    self.recipe.retrieval.observe(self, kept, pre)
    calls = self.calls[...] + 1
    self.calls.value = calls
    self.last_used.value = self.last_used[...].at[local.reshape(-1)].max(calls)

  # ------------------------------------------------------- per-step updates

  def refresh_tucker(self) -> None:
    """u, v <- leading singular vectors of the summed core, sign-aligned
    with the previous ones (outside the gradient); nothing without cores."""
    self.recipe.retrieval.refresh(self)

  def slot_utilisation(self, window: int) -> jax.Array:
    """Fraction of the rows this layer can address that were read at least
    once in its last `window` calls."""
    recent = self.last_used[...] > self.calls[...] - window
    return jnp.mean(recent.astype(jnp.float32))


def memory_layers(model: nnx.Module) -> list[tuple[str, MemoryLayer]]:
  """(slash-joined path, layer) of every memory layer in `model`."""
  return [("/".join(map(str, path)), node)
          for path, node in nnx.iter_graph(model) if isinstance(node, MemoryLayer)]


def _stacked(layer: MemoryLayer) -> bool:
  """Whether `layer` holds every layer's variables stacked on a leading
  axis (``model.scan_layers``, model/scan.py): its call count is [L]."""
  return layer.calls[...].ndim > 0


def refresh_memory(model: nnx.Module) -> None:
  """Once per optimizer step: recompute every layer's u, v (each layer of a
  stacked one on its own)."""
  for _, layer in memory_layers(model):
    if _stacked(layer):
      nnx.vmap(lambda l: l.refresh_tucker(), in_axes=0, out_axes=None)(layer)
    else:
      layer.refresh_tucker()


def memory_utilisation(model: nnx.Module, window: int) -> dict[str, jax.Array]:
  """``layers/<path>/slot_utilisation`` of every memory layer; a stacked
  layer reports each of its layers under its unrolled path
  (``blocks/3/memory``)."""
  out = {}
  for path, layer in memory_layers(model):
    if not _stacked(layer):
      out[f"layers/{path}/slot_utilisation"] = layer.slot_utilisation(window)
      continue
    used = nnx.vmap(lambda l: l.slot_utilisation(window), in_axes=0)(layer)
    container, *rest = path.split("/")
    for i in range(used.shape[0]):
      out[f"layers/{layer_path(container, i, rest)}/slot_utilisation"] = used[i]
  return out
