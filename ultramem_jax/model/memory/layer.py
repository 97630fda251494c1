"""The memory layer module: parameters, buffers, and the forward pass of
spec section 2, steps 1-7. UltraMemV2, UltraMem v1, Memory+, PKM and PEER
are settings of ``model.memory`` (see ``MemoryConfig``), not separate code.

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

from ultramem_jax.model.config import ModelConfig
from ultramem_jax.memory_geometry import memory_geometry
from pallas_kernels import product_key_topk, value_read
from ultramem_jax.model.common import (AuxLoss, LayerMetric, dtype_of,
                                       linear_std, normal_param, param, rms_norm)
from ultramem_jax.model.memory import retrieval as R
from ultramem_jax.parallel import memory_sharding as MS
from ultramem_jax.parallel import tokens
from ultramem_jax.model.memory.values import (ACTIVATIONS, pre_value_products,
                                              weighted_value_sum)

# Stamp of a row never read (far outside any window).
_NEVER = -(2 ** 30)


def use_pallas(kernels: str) -> tuple[bool, bool]:
  """``model.memory.kernels`` -> (use the Pallas kernels, interpret them).
  ``auto`` picks Pallas on TPU and GPU; ``pallas`` on a CPU interprets."""
  accelerator = jax.default_backend() in ("tpu", "gpu")
  if kernels == "xla" or (kernels == "auto" and not accelerator):
    return False, False
  return True, not accelerator


class MemoryBuffer(nnx.Variable):
  """Non-trained state the forward pass reads: pi, u, v."""


class MemoryStat(nnx.Variable):
  """Running statistics kept for logging only."""


def _buffer(cls, value: jax.Array, names: tuple[str | None, ...]) -> nnx.Variable:
  return cls(value, out_sharding=names)


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
  """Mem(h) for the block's normalised input h [..., d] (steps 1-7)."""

  def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs,
               own_table: bool = True):
    mem, geo = cfg.memory, memory_geometry(cfg)
    d, dk, r, h = cfg.d_model, mem.key_dim, mem.tucker_rank, mem.heads
    e, dv, dp = geo.blocks, cfg.value_dim, mem.pre_value_dim
    pdt = dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    self.index, self.d_model = index, d
    self.heads, self.top_m, self.k = h, mem.top_m, mem.k
    self.tucker = mem.score == "tucker"
    self.per_rank_queries = mem.per_rank_queries
    self.eps = cfg.norm_eps
    self.keys_per_side, self.rows_per_block = geo.keys_per_side, geo.rows_per_block
    self.num_blocks, self.value_dim, self.pre_value_dim = e, dv, dp
    self.shared = mem.share_values
    self.offset, self.table_rows = geo.block_offsets[index], geo.table_rows
    self.pre_value_proj = mem.pre_value_proj
    self.activation = mem.value_activation
    self.softmax = mem.normalize_scores == "softmax"
    self.core_penalty_coef, self.core_penalty_tau = mem.core_penalty, mem.core_penalty_tau
    self.key_balance_coef = mem.key_balance
    self.use_pallas, self.interpret = use_pallas(mem.kernels)
    self.table_sharding = mem.table_sharding
    paper = mem.init == "paper"
    lin = linear_std(cfg)
    ns, hq = geo.keys_per_side, 1 if mem.share_query else h

    # Step 1-2 parameters: Wq, keys and the two norm scales (Dk**-0.4 at
    # first; the paper path rescales them, see memory/init.py).
    self.w_q = normal_param(rngs, dk ** -0.5, (d, hq, 2, r, dk),
                            ("embed", "memory_heads", None, "memory_rank",
                             "memory_key_dim"), pdt)
    norm0 = nnx.initializers.constant(dk ** -0.4)
    self.query_norm = param(rngs, norm0, (dk,), ("norm",), pdt)
    self.key_norm = param(rngs, norm0, (dk,), ("norm",), pdt)
    self.keys = normal_param(rngs, dk ** -0.5, (h, 2, ns, dk, r),
                             ("memory_heads", None, "memory_keys",
                              "memory_key_dim", "memory_rank"), pdt)
    # Steps 3-4: Tucker cores, uniform on [0, 1), and their leading
    # singular vectors u, v.
    if self.tucker:
      self.cores = param(rngs, nnx.initializers.uniform(1.0),
                         (mem.tucker_cores, h, r, r),
                         (None, "memory_heads", "memory_rank", None), pdt)
      u, v, _ = R.leading_singular_vectors(self.cores[...])
      u, v = R.align_signs(u, v, jnp.zeros_like(u), jnp.zeros_like(v))
      self.u = _buffer(MemoryBuffer, u, ("memory_heads", "memory_rank"))
      self.v = _buffer(MemoryBuffer, v, ("memory_heads", "memory_rank"))
    # Step 5: the fixed random permutation of the ns*ns virtual slots.
    perm = jax.random.permutation(rngs.params(), ns * ns).astype(jnp.int32)
    self.perm = _buffer(MemoryBuffer, perm, ("memory_slots",))
    # Steps 6-7: pre-value, gate and output projections; the tables.
    if dp and mem.pre_value_proj:
      self.w_p = normal_param(rngs, lin if paper else d ** -0.5, (d, dp),
                              ("embed", "memory_value"), pdt)
    if mem.output_gate:
      self.w_g = normal_param(rngs, lin, (d, e * dv), ("embed", "memory_value"), pdt)
    if mem.output_proj:
      self.w_o = normal_param(rngs, lin if paper else (e * dv) ** -0.5,
                              (e * dv, d), ("memory_value", "embed"), pdt)
    self.table = MemoryTable(cfg, geo.table_rows, rngs=rngs) if own_table else None
    # Logging state: the call at which each window row was last read.
    self.calls = _buffer(MemoryStat, jnp.zeros((), jnp.int32), ())
    self.last_used = _buffer(
        MemoryStat, jnp.full((geo.rows_per_block,), _NEVER, jnp.int32),
        ("memory_rows",))

  # ------------------------------------------------------------------ counts

  def activated_param_count(self) -> int:
    """Parameters one token touches: everything but the tables (all keys
    are scored), plus heads * m rows of Dv + Dp."""
    own = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
    if self.table is not None:
      own -= sum(x.size for x in jax.tree.leaves(nnx.state(self.table, nnx.Param)))
    return own + self.heads * self.top_m * (self.value_dim + self.pre_value_dim)

  def flops_per_token(self) -> int:
    """Forward FLOPs, 2 per multiply-add (spec section 2's operation counts):
    projections, key scoring 2*ns*r*Dk per head, the K x K grid, the
    pre-value dots and the weighted sum."""
    d, dk = self.d_model, self.keys.shape[3]
    r, ns, h, k, m = self.keys.shape[4], self.keys_per_side, self.heads, self.k, self.top_m
    hc = self.cores.shape[0] if self.tucker else 1
    proj = d * self.w_q.shape[1] * 2 * r * dk
    proj += sum(getattr(self, n).size for n in ("w_p", "w_g", "w_o") if hasattr(self, n))
    grid = h * (k * k * r * r if self.tucker else k * k)
    rescore = h * m * hc * r * r if self.tucker else 0
    reads = h * m * (self.pre_value_dim + self.value_dim)
    return 2 * (proj + h * 2 * ns * r * dk + grid + rescore + reads)

  # ------------------------------------------------------------- retrieval

  def retrieve(self, x: jax.Array) -> tuple[R.Retrieved, dict]:
    """Steps 1-4 for tokens x [N, d]; also returns the pre-filter scores
    and picks (for the key-balance loss; the scores only when it is on)."""
    # 1. Queries: a row and a column query per rank (and per query head).
    q_row, q_col = R.queries(x, self.w_q[...], self.query_norm[...], self.eps,
                             heads=self.heads, per_rank=self.per_rank_queries)
    u, v = (self.u[...], self.v[...]) if self.tucker else (None, None)
    pre = {}
    if self.use_pallas:
      # 2-3 fused: the kernel never writes the [N, ns] score rows.
      (top_rows, r_sel), (top_cols, c_sel) = self._pallas_topk(q_row, q_col, u, v)
    if not self.use_pallas or self.key_balance_coef > 0:
      # 2. Sub-key scores against the normalised keys.
      s_row, s_col = R.subkey_scores(q_row, q_col, self.keys[...],
                                     self.key_norm[...], self.eps)
      # 3. Rank-1 pre-filter: a = u . S_row, b = v . S_col; top-K of each.
      pre["a"], pre["b"] = R.prefilter_scores(s_row, s_col, u, v)
      if not self.use_pallas:
        top_rows, r_sel = R.top_k_keys(pre["a"], s_row, self.k, tokens.top_k)
        top_cols, c_sel = R.top_k_keys(pre["b"], s_col, self.k, tokens.top_k)
    pre.update(top_rows=top_rows, top_cols=top_cols)
    # 4. Exact scores on the K x K grid with every core; keep the top m.
    cores = self.cores[...] if self.tucker else None
    kept = R.grid_top_m(r_sel, c_sel, top_rows, top_cols, cores, self.top_m,
                        tokens.top_k)
    return kept, pre

  def _pallas_topk(self, q_row, q_col, u, v):
    """Steps 2-3 with ``pallas_kernels.product_key_topk``: one kernel group
    per (head, side). Returns ((top_rows, r_sel), (top_cols, c_sel)) shaped
    [N, H, K] and [N, H, K, r]."""
    n, h, r, dk = q_row.shape
    kn = rms_norm(self.keys[...], self.key_norm[...], self.eps, axis=3)
    q = jnp.stack([q_row, q_col], axis=2)                     # [N, H, 2, r, Dk]
    q = jnp.transpose(q, (1, 2, 0, 3, 4)).reshape(2 * h, n, r, dk)
    keys = jnp.swapaxes(kn, 3, 4).reshape(2 * h, -1, r, dk)   # [2H, ns, r, Dk]
    uv = (jnp.ones((h, 2, r), jnp.float32) if u is None
          else jnp.stack([u, v], axis=1))
    topk = lambda q, keys, uv: product_key_topk(q, keys, uv, self.k,
                                                interpret=self.interpret)
    args = (q, keys.astype(q.dtype), uv.reshape(2 * h, r))
    mesh = tokens.active_mesh()
    if mesh is None:
      idx, scores = topk(*args)
    else:   # each device scores its own tokens; keys are replicated
      idx, scores = tokens.shard_tokens(topk, mesh, args, token_axis=1)
    idx = jnp.transpose(idx.reshape(h, 2, n, -1), (1, 2, 0, 3))     # [2, N, H, K]
    scores = jnp.transpose(scores.reshape(h, 2, n, -1, r), (1, 2, 0, 3, 4))
    return (idx[0], scores[0]), (idx[1], scores[1])

  # --------------------------------------------------------------- forward

  def __call__(self, h: jax.Array, shared_table: MemoryTable | None = None) -> jax.Array:
    shape, dt = h.shape, self.dtype
    x = h.reshape(-1, shape[-1]).astype(dt)
    n, heads, m = x.shape[0], self.heads, self.top_m
    table = self.table if self.table is not None else shared_table
    if table is None:
      raise ValueError("this memory layer reads a shared table; pass it")
    kept, pre = self.retrieve(x)

    # 5. Slot addressing through the fixed permutation.
    slots, blocks, local = R.addresses(
        kept.rows, kept.cols, self.perm[...], keys_per_side=self.keys_per_side,
        rows_per_block=self.rows_per_block, offset=self.offset,
        table_rows=self.table_rows if self.shared else None)

    # 6. Value processing. Weights per core chunk: the raw kept scores g_c
    # (no softmax, the paper), or a softmax over each head's m scores.
    w = kept.core_scores
    if self.softmax:
      w = jax.nn.softmax(w, axis=2)
    w = w.reshape(n, heads * m, -1)
    slots, blocks = slots.reshape(n, heads * m), blocks.reshape(n, heads * m)
    z = pre_values = None
    if self.pre_value_dim:
      z = x @ self.w_p[...].astype(dt) if self.pre_value_proj else x
      pre_values = table.pre_values[...]
    mesh = tokens.active_mesh()
    if mesh is not None and (self.use_pallas or MS.group_size(mesh) > 1):
      # Over a mesh: tables sharded over `memory`, explicit collectives.
      o = MS.sharded_read(
          slots, w, table.values[...], z=z, pre_values=pre_values,
          blocks=blocks, num_blocks=self.num_blocks, dtype=dt,
          mode=self.table_sharding, read=self._read_local,
          pre_products=pre_value_products,
          act=ACTIVATIONS[self.activation])
    else:
      o = self._read_local(slots, w, table.values[...], blocks, z, pre_values,
                           dtype=dt)

    # 7. Output: (gate and) the single output projection.
    if hasattr(self, "w_g"):
      o = o * jax.nn.silu(x @ self.w_g[...].astype(dt))
    y = o @ self.w_o[...].astype(dt) if hasattr(self, "w_o") else o

    self._observe(kept, pre, local)
    return y.reshape(shape).astype(dt)

  def _read_local(self, slots, weights, values, blocks, z=None,
                  pre_values=None, dtype=jnp.float32):
    """Step 6 on one device's tables (or shards of them): the Pallas kernel,
    which fuses the pre-value dot, its activation and the weighted sum, or
    pure JAX. Returns [N, E * Dv_local] in `dtype`."""
    if self.use_pallas:
      return value_read(slots, weights, values, z=z, pre_values=pre_values,
                        activation=self.activation, blocks=blocks,
                        num_blocks=self.num_blocks, dtype=dtype,
                        interpret=self.interpret)
    if z is not None:
      a = pre_value_products(z, slots, pre_values)
      weights = weights * ACTIVATIONS[self.activation](a)[..., None]
    return weighted_value_sum(slots, weights, values, blocks=blocks,
                              num_blocks=self.num_blocks, dtype=dtype)

  def _observe(self, kept: R.Retrieved, pre: dict, local: jax.Array) -> None:
    """Optional losses, logged metrics and the slot-use stamps."""
    sg = jax.lax.stop_gradient
    if self.tucker and self.core_penalty_coef > 0:
      self.sow(AuxLoss, "core_penalty", self.core_penalty_coef
               * R.core_penalty(self.cores[...], self.core_penalty_tau))
    if self.key_balance_coef > 0:
      self.sow(AuxLoss, "key_balance", self.key_balance_coef * (
          R.key_balance_loss(pre["a"], pre["top_rows"])
          + R.key_balance_loss(pre["b"], pre["top_cols"])))
    self.sow(LayerMetric, "score_top1", sg(jnp.mean(kept.scores[..., 0])))
    self.sow(LayerMetric, "score_topm", sg(jnp.mean(kept.scores[..., -1])))
    if self.tucker:
      _, _, sv = R.leading_singular_vectors(sg(self.cores[...]))
      for i in range(sv.shape[-1]):
        self.sow(LayerMetric, f"core_sv{i + 1}", jnp.mean(sv[:, i]))
    calls = self.calls[...] + 1
    self.calls.value = calls
    self.last_used.value = self.last_used[...].at[local.reshape(-1)].max(calls)

  # ------------------------------------------------------- per-step updates

  def refresh_tucker(self) -> None:
    """u, v <- leading singular vectors of the summed core, sign-aligned
    with the previous ones (outside the gradient)."""
    if not self.tucker:
      return
    u, v, _ = R.leading_singular_vectors(jax.lax.stop_gradient(self.cores[...]))
    u, v = R.align_signs(u, v, self.u[...], self.v[...])
    self.u.value, self.v.value = u, v

  def slot_utilisation(self, window: int) -> jax.Array:
    """Fraction of the rows this layer can address that were read at least
    once in its last `window` calls."""
    recent = self.last_used[...] > self.calls[...] - window
    return jnp.mean(recent.astype(jnp.float32))


def memory_layers(model: nnx.Module) -> list[tuple[str, MemoryLayer]]:
  """(slash-joined path, layer) of every memory layer in `model`."""
  return [("/".join(map(str, path)), node)
          for path, node in nnx.iter_graph(model) if isinstance(node, MemoryLayer)]


def refresh_memory(model: nnx.Module) -> None:
  """Once per optimizer step: recompute every layer's u, v."""
  for _, layer in memory_layers(model):
    layer.refresh_tucker()


def memory_utilisation(model: nnx.Module, window: int) -> dict[str, jax.Array]:
  """``layers/<path>/slot_utilisation`` of every memory layer."""
  return {f"layers/{path}/slot_utilisation": layer.slot_utilisation(window)
          for path, layer in memory_layers(model)}
