"""The last two stages of a memory layer: the value read (spec section 2,
step 6) and the output (step 7). See ``stages.py`` for the stage design."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import value_read
from pallas_kernels.reference import (ACTIVATIONS, pre_value_products,
                                      weighted_value_sum)
from ultramem_jax.model.common import normal_param, weight_dot
from ultramem_jax.model.memory.stages import Sizes
from ultramem_jax.parallel import memory_sharding as MS
from ultramem_jax.parallel import tokens


# --------------------------------------------------------------------------
# Value read, step 6
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectedPreValues:
  """UltraMemV2: z = Wp h, Dp wide."""
  dim: int
  std: float

  def create(self, rngs: nnx.Rngs, sizes: Sizes) -> dict[str, nnx.Variable]:
    return {"w_p": normal_param(rngs, self.std, (sizes.d_model, self.dim),
                                ("embed", "memory_value"), sizes.param_dtype)}

  def inputs(self, layer, x: jax.Array) -> jax.Array:
    return weight_dot(x, layer.w_p[...], x.dtype)

  def flops(self, layer) -> int:
    return layer.w_p.size


@dataclasses.dataclass(frozen=True)
class InputPreValues:
  """PEER: z = h itself (Dp = d), no projection."""
  dim: int

  def create(self, rngs: nnx.Rngs, sizes: Sizes) -> dict[str, nnx.Variable]:
    return {}

  def inputs(self, layer, x: jax.Array) -> jax.Array:
    return x

  def flops(self, layer) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class ValueRead:
  """o = sum_k w_k V[p_k] per value block and core chunk, with w_k = g_c *
  act(<z, P[p_k]>) when there are pre-values. Over a mesh (or with the
  Pallas kernels on one) the tables are sharded over ``memory`` and read
  with explicit collectives (parallel/memory_sharding.py)."""
  pre_values: ProjectedPreValues | InputPreValues | None
  activation: str
  blocks: int             # E: v1's implicit value expansion, 1 otherwise
  table_sharding: str

  @property
  def pre_value_dim(self) -> int:
    return self.pre_values.dim if self.pre_values is not None else 0

  def create(self, rngs: nnx.Rngs, sizes: Sizes) -> dict[str, nnx.Variable]:
    return self.pre_values.create(rngs, sizes) if self.pre_values is not None else {}

  def __call__(self, layer, x, slots, weights, blocks, table) -> jax.Array:
    """x [N, d]; slots, blocks [N, S]; weights [N, S, hc] -> [N, E * Dv]."""
    dt = x.dtype
    z = pre_values = None
    if self.pre_values is not None:
      z, pre_values = self.pre_values.inputs(layer, x), table.pre_values[...]
    mesh = tokens.active_mesh()
    read = lambda *args, **kw: self.local(layer, *args, **kw)
    host = layer.host_read
    if mesh is not None and (layer.use_pallas or host is not None
                             or MS.group_size(mesh) > 1):
      # Over a mesh: tables sharded over `memory`, explicit collectives;
      # host tables are read per device, on its own host shard.
      return MS.sharded_read(
          slots, weights, table.values[...], z=z, pre_values=pre_values,
          blocks=blocks, num_blocks=self.blocks, dtype=dt,
          mode=self.table_sharding, read=read,
          pre_products=host.pre_products if host else pre_value_products,
          act=ACTIVATIONS[self.activation])
    return read(slots, weights, table.values[...], blocks, z, pre_values, dtype=dt)

  def local(self, layer, slots, weights, values, blocks, z=None,
            pre_values=None, dtype=jnp.float32) -> jax.Array:
    """Step 6 on one device's tables (or shards of them): the Pallas kernel,
    which fuses the pre-value dot, its activation and the weighted sum, or
    pure JAX; with host tables, the host read (host_read.py). Returns
    [N, E * Dv_local] in `dtype`."""
    if layer.host_read is not None:
      return layer.host_read.read(slots, weights, values, blocks, z, pre_values,
                                  dtype=dtype)
    if layer.use_pallas:
      return value_read(slots, weights, values, z=z, pre_values=pre_values,
                        activation=self.activation, blocks=blocks,
                        num_blocks=self.blocks, dtype=dtype,
                        interpret=layer.interpret)
    if z is not None:
      a = pre_value_products(z, slots, pre_values)
      weights = weights * ACTIVATIONS[self.activation](a)[..., None]
    return weighted_value_sum(slots, weights, values, blocks=blocks,
                              num_blocks=self.blocks, dtype=dtype)

  def flops(self, layer, slots: int) -> int:
    """The pre-value projection, and per kept slot its Dp + Dv."""
    proj = self.pre_values.flops(layer) if self.pre_values is not None else 0
    return proj + slots * (self.pre_value_dim + layer.value_dim)


# --------------------------------------------------------------------------
# Output, step 7
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputProjection:
  """y = Wo o, E*Dv -> d."""
  std: float

  def create(self, rngs: nnx.Rngs, sizes: Sizes) -> dict[str, nnx.Variable]:
    return {"w_o": normal_param(rngs, self.std, (sizes.read_width, sizes.d_model),
                                ("memory_value", "embed"), sizes.param_dtype)}

  def __call__(self, layer, x: jax.Array, o: jax.Array) -> jax.Array:
    return weight_dot(o, layer.w_o[...], x.dtype)

  def flops(self, layer) -> int:
    return layer.w_o.size


@dataclasses.dataclass(frozen=True)
class GatedOutput:
  """Memory+: y = Wo(o * silu(Wg h)); with ``output_proj: false`` the gated
  read itself, o * silu(Wg h)."""
  gate_std: float
  projection: OutputProjection | NoOutput

  def create(self, rngs: nnx.Rngs, sizes: Sizes) -> dict[str, nnx.Variable]:
    w_g = normal_param(rngs, self.gate_std, (sizes.d_model, sizes.read_width),
                       ("embed", "memory_value"), sizes.param_dtype)
    return {"w_g": w_g, **self.projection.create(rngs, sizes)}

  def __call__(self, layer, x: jax.Array, o: jax.Array) -> jax.Array:
    gated = o * jax.nn.silu(weight_dot(x, layer.w_g[...], x.dtype))
    return self.projection(layer, x, gated)

  def flops(self, layer) -> int:
    return layer.w_g.size + self.projection.flops(layer)


@dataclasses.dataclass(frozen=True)
class NoOutput:
  """PKM, PEER: the read values are the output (E*Dv = d)."""

  def create(self, rngs: nnx.Rngs, sizes: Sizes) -> dict[str, nnx.Variable]:
    return {}

  def __call__(self, layer, x: jax.Array, o: jax.Array) -> jax.Array:
    return o

  def flops(self, layer) -> int:
    return 0
