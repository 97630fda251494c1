"""The stages of a memory layer, spec section 2 (step numbers in comments).

A memory layer is four stages run in order (``recipe.py`` builds them from
``model.memory``; ``layer.py`` runs them):

- retrieval, steps 1-5: :class:`TuckerRetrieval` (UltraMem, UltraMemV2: the
  rank-1 pre-filter, then Tucker cores on the K x K grid) or
  :class:`SumRetrieval` (PKM, Memory+, PEER: g = S_row + S_col);
- weighting, the start of step 6: :class:`RawWeights` (the kept scores, the
  paper) or :class:`SoftmaxWeights` (over each head's top-m);
- value read, step 6 (``readout.py``): :class:`ValueRead`, with
  :class:`ProjectedPreValues` (UltraMemV2: z = Wp h), :class:`InputPreValues`
  (PEER: z = h) or no pre-values, an activation on <z, P[p]>, the
  multi-core weighted sum and v1's value blocks;
- output, step 7 (``readout.py``): :class:`OutputProjection` (Wo),
  :class:`GatedOutput` (Memory+: Wo(o * silu(Wg h))) or :class:`NoOutput`
  (PKM, PEER: o itself).

Every stage creates its variables in the order the layer always drew them
(Wq, norms, keys, cores, pi, Wp, Wg, Wo), so a seed gives the same model.

Stages are frozen dataclasses: settings only, no arrays. Each one creates the
NNX variables it uses (``create``, returning them by name) and the layer
keeps them as its own attributes under those names, so checkpoints,
sharding rules and optimizer labels see the same paths whatever the recipe.
A stage reads its variables back from the layer by the names it created.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import product_key_topk
from ultramem_jax.model.common import (AuxLoss, LayerMetric,
                                       balance_fraction, normal_param, param,
                                       rms_norm)
from ultramem_jax.model.memory import retrieval as R
from ultramem_jax.model.remat import name_retrieved, named_top_k
from ultramem_jax.parallel import tokens

# The top-k of steps 3-4 with its outputs named for model.remat's
# save_dots_and_retrieval policy (model/remat.py).
_top_k = named_top_k(tokens.top_k)


class MemoryBuffer(nnx.Variable):
  """Non-trained state the forward pass reads: pi, u, v."""


def _buffer(value: jax.Array, names: tuple[str | None, ...]) -> MemoryBuffer:
  return MemoryBuffer(value, out_sharding=names)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What a stage needs from the layer's geometry to create its variables
  (d, the keys per side, the read's width, the parameter dtype)."""
  d_model: int
  keys_per_side: int
  read_width: int         # E * Dv, the width of the value read
  param_dtype: object


# --------------------------------------------------------------------------
# Retrieval, steps 1-5
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Retrieval:
  """Steps 1-5 shared by both scorings: queries (Wq, QueryNorm), sub-keys
  (KeyNorm), the pre-filter's top-K per side, the grid's top-m and the slot
  permutation pi. Subclasses say how a (row, column) pair is scored."""
  heads: int
  query_heads: int        # 1 when every head shares one query (UltraMem v1)
  key_dim: int
  rank: int
  k: int                  # pre-filter width K
  top_m: int
  per_rank_queries: bool
  key_balance: float
  ring: bool              # a shared table read through a ring window (sec. 4)

  tucker: ClassVar[bool] = False
  # Calibration: g is bilinear in each norm-scale pair (Tucker) or linear.
  score_power: ClassVar[float] = -0.5

  def create(self, rngs: nnx.Rngs, sizes: Sizes) -> dict[str, nnx.Variable]:
    """Wq, the two norm scales (Dk**-0.4 at first; the paper path rescales
    them, see memory/init.py), the keys, the scoring's own variables and
    the fixed random permutation of the ns*ns virtual slots."""
    d, dk, r, h = sizes.d_model, self.key_dim, self.rank, self.heads
    ns, pdt = sizes.keys_per_side, sizes.param_dtype
    out = {"w_q": normal_param(rngs, dk ** -0.5, (d, self.query_heads, 2, r, dk),
                               ("embed", "memory_heads", None, "memory_rank",
                                "memory_key_dim"), pdt)}
    norm0 = nnx.initializers.constant(dk ** -0.4)
    out["query_norm"] = param(rngs, norm0, (dk,), ("norm",), pdt)
    out["key_norm"] = param(rngs, norm0, (dk,), ("norm",), pdt)
    out["keys"] = normal_param(rngs, dk ** -0.5, (h, 2, ns, dk, r),
                               ("memory_heads", None, "memory_keys",
                                "memory_key_dim", "memory_rank"), pdt)
    out.update(self._create_scoring(rngs, pdt))
    # Step 5: the fixed random permutation of the ns*ns virtual slots.
    perm = jax.random.permutation(rngs.params(), ns * ns).astype(jnp.int32)
    out["perm"] = _buffer(perm, ("memory_slots",))
    return out

  def _create_scoring(self, rngs: nnx.Rngs, pdt) -> dict[str, nnx.Variable]:
    return {}

  # The scoring's parts (None: g = S_row + S_col, a = S_row, b = S_col).
  def prefilter_vectors(self, layer):
    return None, None

  def summed_cores(self, layer):
    return None

  def retrieve(self, layer, x: jax.Array) -> tuple[R.Retrieved, dict]:
    """Steps 1-4 for tokens x [N, d]; also returns the pre-filter scores
    and picks (for the key-balance loss; the scores only when it is on)."""
    # 1. Queries: a row and a column query per rank (and per query head).
    q_row, q_col = R.queries(x, layer.w_q[...], layer.query_norm[...], layer.eps,
                             heads=self.heads, per_rank=self.per_rank_queries)
    u, v = self.prefilter_vectors(layer)
    pre = {}
    if layer.use_pallas:
      # 2-3 fused: the kernel never writes the [N, ns] score rows.
      (top_rows, r_sel), (top_cols, c_sel) = self._pallas_topk(
          layer, q_row, q_col, u, v)
    if not layer.use_pallas or self.key_balance > 0:
      # 2. Sub-key scores against the normalised keys.
      s_row, s_col = R.subkey_scores(q_row, q_col, layer.keys[...],
                                     layer.key_norm[...], layer.eps)
      # 3. Rank-1 pre-filter: a = u . S_row, b = v . S_col; top-K of each.
      pre["a"], pre["b"] = R.prefilter_scores(s_row, s_col, u, v)
      if not layer.use_pallas:
        top_rows, r_sel = R.top_k_keys(pre["a"], s_row, self.k, _top_k)
        top_cols, c_sel = R.top_k_keys(pre["b"], s_col, self.k, _top_k)
    pre.update(top_rows=top_rows, top_cols=top_cols)
    # 4. Exact scores on the K x K grid with every core; keep the top m.
    kept = R.grid_top_m(r_sel, c_sel, top_rows, top_cols, self.summed_cores(layer),
                        self.top_m, _top_k)
    return kept, pre

  def _pallas_topk(self, layer, q_row, q_col, u, v):
    """Steps 2-3 with ``pallas_kernels.product_key_topk``: one kernel group
    per (head, side). Returns ((top_rows, r_sel), (top_cols, c_sel)) shaped
    [N, H, K] and [N, H, K, r]."""
    n, h, r, dk = q_row.shape
    kn = rms_norm(layer.keys[...], layer.key_norm[...], layer.eps, axis=3)
    q = jnp.stack([q_row, q_col], axis=2)                     # [N, H, 2, r, Dk]
    q = jnp.transpose(q, (1, 2, 0, 3, 4)).reshape(2 * h, n, r, dk)
    keys = jnp.swapaxes(kn, 3, 4).reshape(2 * h, -1, r, dk)   # [2H, ns, r, Dk]
    uv = (jnp.ones((h, 2, r), jnp.float32) if u is None
          else jnp.stack([u, v], axis=1))
    topk = lambda q, keys, uv: product_key_topk(q, keys, uv, self.k,
                                                interpret=layer.interpret)
    args = (q, keys.astype(q.dtype), uv.reshape(2 * h, r))
    mesh = tokens.active_mesh()
    if mesh is None:
      idx, scores = topk(*args)
    else:   # each device scores its own tokens; keys are replicated
      idx, scores = tokens.shard_tokens(topk, mesh, args, token_axis=1)
    idx = jnp.transpose(idx.reshape(h, 2, n, -1), (1, 2, 0, 3))     # [2, N, H, K]
    scores = jnp.transpose(scores.reshape(h, 2, n, -1, r), (1, 2, 0, 3, 4))
    idx, scores = name_retrieved(idx, scores)
    return (idx[0], scores[0]), (idx[1], scores[1])

  def addresses(self, layer, kept: R.Retrieved):
    """5. Slot addressing through the fixed permutation: (physical row,
    value block, window-local row), each [N, H, m]. Key expansion needs
    nothing else: its X*X folded slots per row land in one value block, so
    the read's weighted sum adds them (the released code's block sum)."""
    return R.addresses(kept.rows, kept.cols, layer.perm[...],
                       keys_per_side=layer.keys_per_side,
                       rows_per_block=layer.rows_per_block, offset=layer.offset,
                       table_rows=layer.table_rows if self.ring else None,
                       block_slots=layer.block_slots)

  def observe(self, layer, kept: R.Retrieved, pre: dict) -> None:
    """The key-balance loss (when on) and the kept-score metrics."""
    if self.key_balance > 0:
      ns = pre["a"].shape[-1]
      f_rows = balance_fraction(layer, "key_balance_rows",
                                R.pick_fraction(pre["top_rows"], ns))
      f_cols = balance_fraction(layer, "key_balance_cols",
                                R.pick_fraction(pre["top_cols"], ns))
      layer.sow(AuxLoss, "key_balance", self.key_balance * (
          R.key_balance_loss(pre["a"], pre["top_rows"], f_rows)
          + R.key_balance_loss(pre["b"], pre["top_cols"], f_cols)))
    sg = jax.lax.stop_gradient
    layer.sow(LayerMetric, "score_top1", sg(jnp.mean(kept.scores[..., 0])))
    layer.sow(LayerMetric, "score_topm", sg(jnp.mean(kept.scores[..., -1])))

  def refresh(self, layer) -> None:
    """Once per optimizer step (nothing to do without cores)."""

  def flops(self, layer) -> int:
    """Multiply-adds per token: queries, key scoring 2*ns*r*Dk per head
    and the K x K grid."""
    d, dk, r, h, k = layer.d_model, self.key_dim, self.rank, self.heads, self.k
    proj = d * self.query_heads * 2 * r * dk
    return proj + h * 2 * layer.keys_per_side * r * dk + h * k * k


@dataclasses.dataclass(frozen=True)
class SumRetrieval(Retrieval):
  """PKM, Memory+, PEER: g = S_row + S_col (rank 1, one core), the
  pre-filter's a = S_row, b = S_col."""


@dataclasses.dataclass(frozen=True)
class TuckerRetrieval(Retrieval):
  """UltraMem, UltraMemV2: g_c = S_row^T C_c S_col over hc cores, the rank-1
  pre-filter from the summed core's leading singular vectors u, v; the
  optional core penalty."""
  cores: int = 1
  core_penalty: float = 0.0
  core_penalty_tau: float = 0.0

  tucker: ClassVar[bool] = True
  score_power: ClassVar[float] = -0.25

  def _create_scoring(self, rngs: nnx.Rngs, pdt) -> dict[str, nnx.Variable]:
    """Steps 3-4: Tucker cores, uniform on [0, 1), and their leading
    singular vectors u, v."""
    h, r = self.heads, self.rank
    cores = param(rngs, nnx.initializers.uniform(1.0), (self.cores, h, r, r),
                  (None, "memory_heads", "memory_rank", None), pdt)
    u, v, _ = R.leading_singular_vectors(cores[...])
    u, v = R.align_signs(u, v, jnp.zeros_like(u), jnp.zeros_like(v))
    return {"cores": cores,
            "u": _buffer(u, ("memory_heads", "memory_rank")),
            "v": _buffer(v, ("memory_heads", "memory_rank"))}

  def prefilter_vectors(self, layer):
    return layer.u[...], layer.v[...]

  def summed_cores(self, layer):
    return layer.cores[...]

  def observe(self, layer, kept: R.Retrieved, pre: dict) -> None:
    """The core penalty (when on), then the shared losses and metrics, then
    the summed core's singular values."""
    sg = jax.lax.stop_gradient
    if self.core_penalty > 0:
      layer.sow(AuxLoss, "core_penalty", self.core_penalty
                * R.core_penalty(layer.cores[...], self.core_penalty_tau))
    super().observe(layer, kept, pre)
    _, _, sv = R.leading_singular_vectors(sg(layer.cores[...]))
    for i in range(sv.shape[-1]):
      layer.sow(LayerMetric, f"core_sv{i + 1}", jnp.mean(sv[:, i]))

  def refresh(self, layer) -> None:
    """u, v <- leading singular vectors of the summed core, sign-aligned
    with the previous ones (outside the gradient)."""
    u, v, _ = R.leading_singular_vectors(jax.lax.stop_gradient(layer.cores[...]))
    u, v = R.align_signs(u, v, layer.u[...], layer.v[...])
    layer.u.value, layer.v.value = u, v

  def flops(self, layer) -> int:
    """Adds the r x r core on the grid and each kept pair's re-scoring."""
    h, k, r, m = self.heads, self.k, self.rank, self.top_m
    grid = h * k * k * r * r
    rescore = h * m * self.cores * r * r
    return super().flops(layer) - h * k * k + grid + rescore


# --------------------------------------------------------------------------
# Weighting, step 6 (the weights g_c of the kept slots)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RawWeights:
  """The kept scores g_c weight the values as they are (the paper)."""

  def __call__(self, core_scores: jax.Array) -> jax.Array:
    return core_scores


@dataclasses.dataclass(frozen=True)
class SoftmaxWeights:
  """A softmax over each head's m kept scores (PKM, Memory+, PEER; one
  core)."""

  def __call__(self, core_scores: jax.Array) -> jax.Array:
    return jax.nn.softmax(core_scores, axis=2)

