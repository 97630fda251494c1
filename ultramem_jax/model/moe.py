"""Fine-grained top-k mixture of SwiGLU experts (the OLMoE-style baseline).

For the N = B * T tokens x_n of a block:

    logits = x W_r  (float32, [N, E]),   p = softmax(logits)
    (w_n, e_n) = top_k(p_n)               (w / sum(w) when ``renormalize``)
    y_n = sum_j w_nj * Expert_{e_nj}(x_n)  [+ SharedSwiGLU(x_n)]
    Expert_e(x) = (silu(x G_e) * (x U_e)) D_e

Two dispatch strategies compute the same sum:

- dropless (``capacity_factor == 0``): the N*k assignments are sorted by
  expert and fed to grouped matmuls (``jax.lax.ragged_dot``);
- capacity (``capacity_factor > 0``): expert e keeps only its first
  C = ceil(capacity_factor * N * k / E) assignments in token order, in an
  [E, C, d] buffer processed by batched einsums; the rest are dropped.

Auxiliary losses are sown as :class:`AuxLoss` (added to the training loss),
diagnostics as :class:`LayerMetric` (logged only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.model.common import (AuxLoss, LayerMetric,
                                       balance_fraction, dtype_of, linear_std,
                                       normal_param, output_std, weight_dot)
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.ffn import SwiGLU, register_ffn
from ultramem_jax.parallel import expert_sharding as ES
from ultramem_jax.parallel import tokens

# ``auto`` takes the ``loop`` path up to this many rows (assignments) per
# expert on average: decode batches up to 64 with 64 experts and top-8.
# Beyond, the batched paths do more FLOPs per second, and training (whose
# weight gradient the loop accumulates into [E, ...] arrays) stays on them.
LOOP_ROWS_PER_EXPERT = 8

def load_balance_loss(fraction: jax.Array, mean_prob: jax.Array,
                      coef: float) -> jax.Array:
  """coef * E * sum_e f_e * p_e (Switch / OLMoE); equals coef when either
  f or p is uniform, and grows up to coef * E as routing collapses."""
  return coef * fraction.shape[-1] * jnp.sum(fraction * mean_prob)


def grouped_swiglu_ragged(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                          w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """SwiGLU over rows grouped by expert: rows [sum_{e'<e} g_e', ...+g_e)
  use expert e; rows past sum(g) give zeros. On TPU the megablox ``gmm``
  kernel is the drop-in for ``ragged_dot``; on CPU ragged_dot lowers to a
  dense masked product (E times the FLOPs and an [E, rows, d] temporary)."""
  rd = jax.lax.ragged_dot
  gate = jax.nn.silu(rd(xs, w_gate, group_sizes))
  return rd(gate * rd(xs, w_up, group_sizes), w_down, group_sizes)


def grouped_swiglu_gather(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                          w_up: jax.Array, w_down: jax.Array,
                          dtype=None) -> jax.Array:
  """The same grouped SwiGLU with each row's expert weights gathered (and
  then cast to `dtype`, if given):
  [rows, d, f] per matrix. It reads only the experts the rows use, which is
  what a decode step should cost (spec section 7: min(B*k, E) experts), and
  is chosen by ``auto`` when there are no more rows than experts. Rows past
  sum(g) give zeros."""
  ends = jnp.cumsum(group_sizes)
  row = jnp.arange(xs.shape[0])
  expert = jnp.minimum(jnp.searchsorted(ends, row, side="right"),
                       group_sizes.shape[0] - 1)
  mm = lambda v, w: jnp.einsum("ri,rio->ro", v, w[expert].astype(dtype or w.dtype))
  out = mm(jax.nn.silu(mm(xs, w_gate)) * mm(xs, w_up), w_down)
  return jnp.where((row < ends[-1])[:, None], out, 0)


def grouped_swiglu_blocked(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                           w_up: jax.Array, w_down: jax.Array,
                           block: int) -> jax.Array:
  """The same grouped SwiGLU, exactly, without ragged_dot: each expert's
  rows are padded to a multiple of the block size b, so every block of b
  rows belongs to one expert; blocks are multiplied by their expert's
  weights in one batched einsum. FLOPs are (rows + E*(b-1)) / rows of the
  ideal, and the gathered weights are [blocks, d, f]. Rows past sum(g)
  go to no block and give zeros."""
  rows, d = xs.shape
  e = group_sizes.shape[0]
  n_blocks = -(-(rows + e * (block - 1)) // block)
  ends = jnp.cumsum(group_sizes)
  row = jnp.arange(rows)
  row_expert = jnp.minimum(jnp.searchsorted(ends, row, side="right"), e - 1)
  padded = -(-group_sizes // block) * block
  padded_start = jnp.cumsum(padded) - padded
  start = ends - group_sizes
  dest = padded_start[row_expert] + row - start[row_expert]
  dest = jnp.where(row < ends[-1], dest, n_blocks * block)   # past the groups
  # Expert of each block; blocks past the last group get expert 0 and zeros.
  block_expert = jnp.clip(jnp.searchsorted(
      jnp.cumsum(padded), jnp.arange(n_blocks) * block, side="right"), 0, e - 1)
  xb = jnp.zeros((n_blocks * block, d), xs.dtype).at[dest].set(xs, mode="drop")
  xb = xb.reshape(n_blocks, block, d)
  mm = lambda v, w: jnp.einsum("nbi,nio->nbo", v, w[block_expert])
  h = jax.nn.silu(mm(xb, w_gate)) * mm(xb, w_up)
  out = mm(h, w_down).reshape(n_blocks * block, d)
  return out.at[dest].get(mode="fill", fill_value=0)


def loop_block(rows: int, num_experts: int, cap: int) -> int:
  """Rows per block of the ``loop`` path: the power of two at or above the
  mean rows per expert (1 at decode batch 1, 8 at batch 64 with 64 experts
  and top-8), at most `cap` (``block_size``)."""
  mean = -(-rows // num_experts)
  return max(1, min(cap, 1 << (mean - 1).bit_length()))


def grouped_swiglu_loop(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                        w_up: jax.Array, w_down: jax.Array, block: int,
                        dtype=None) -> jax.Array:
  """The same grouped SwiGLU as a loop over blocks of at most `block` rows
  of one expert: each block slices its expert's three matrices out of the
  [E, ...] weights in place (``dynamic_index``; cast to `dtype`, if given,
  after the slice: only the experts used are cast, and on CPU float32
  weights are not rounded, see ``common.weight_dot``) and multiplies all
  its rows by them. Empty blocks (a static bound of ceil(rows / b) + min(E,
  rows) blocks, most of them unused) are skipped by a ``cond``, so a step
  reads each used expert once when it has at most b rows and never reads
  an unused one: the bytes of a decode step. FLOPs are at most (rows +
  used * (b - 1)) / rows of the ideal. A ``fori_loop`` with static bounds,
  so it is differentiable (the weight gradient accumulates into [E, ...]
  arrays: meant for decoding, not for training). Rows past sum(g) give
  zeros."""
  rows, d = xs.shape
  e = group_sizes.shape[0]
  n_blocks = -(-rows // block) + min(e, rows)
  ends = jnp.cumsum(group_sizes)
  per_expert = -(-group_sizes // block)            # blocks of each expert
  block_ends = jnp.cumsum(per_expert)
  i = jnp.arange(n_blocks)
  expert = jnp.minimum(jnp.searchsorted(block_ends, i, side="right"), e - 1)
  first = ends[expert] - group_sizes[expert] + (
      i - block_ends[expert] + per_expert[expert]) * block
  count = jnp.where(i < block_ends[-1],
                    jnp.clip(ends[expert] - first, 0, block), 0)
  # b rows of padding so that every block's window lies inside the buffer.
  xp = jnp.concatenate([xs, jnp.zeros((block, d), xs.dtype)])
  dt = dtype or xs.dtype
  mm = lambda v, w, j: weight_dot(
      v, jax.lax.dynamic_index_in_dim(w, expert[j], keepdims=False), dt)

  def run(j, out):
    x = jax.lax.dynamic_slice_in_dim(xp, first[j], block).astype(dt)
    y = mm(jax.nn.silu(mm(x, w_gate, j)) * mm(x, w_up, j), w_down, j)
    old = jax.lax.dynamic_slice_in_dim(out, first[j], block)
    y = jnp.where((jnp.arange(block) < count[j])[:, None], y.astype(out.dtype), old)
    return jax.lax.dynamic_update_slice_in_dim(out, y, first[j], 0)

  out = jax.lax.fori_loop(
      0, n_blocks,
      lambda j, out: jax.lax.cond(count[j] > 0, run, lambda j, out: out, j, out),
      jnp.zeros((rows + block, d), dt))
  return out[:rows]


@register_ffn("moe")
class MoE(nnx.Module):
  """y = sum over the top-k experts of w_e * SwiGLU_e(h) (+ shared experts)."""

  def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
    m = cfg.ffn.moe
    d, f, e = cfg.d_model, cfg.expert_dim, m.num_experts
    self.d_model, self.expert_dim, self.num_experts = d, f, e
    self.top_k = m.top_k
    self.renormalize = m.renormalize
    self.capacity_factor = float(m.capacity_factor)
    self.load_balance_coef = float(m.load_balance_coef)
    self.z_loss_coef = float(m.z_loss_coef)
    self.num_shared_experts = m.num_shared_experts
    self.grouped_matmul = m.grouped_matmul
    self.block_size = m.block_size
    self.dtype = dtype_of(cfg.dtype)
    pdt = dtype_of(cfg.param_dtype)
    std, out_std = linear_std(cfg), output_std(cfg)
    self.router = normal_param(rngs, std, (d, e), ("embed", "router_logits"), pdt)
    self.w_gate = normal_param(rngs, std, (e, d, f), ("expert", "embed", "mlp"), pdt)
    self.w_up = normal_param(rngs, std, (e, d, f), ("expert", "embed", "mlp"), pdt)
    self.w_down = normal_param(rngs, out_std, (e, f, d), ("expert", "mlp", "embed"),
                               pdt)
    self.shared = (SwiGLU(cfg, layer_index, rngs=rngs,
                          inner_dim=m.num_shared_experts * f)
                   if m.num_shared_experts > 0 else None)

  # ------------------------------------------------------------------ counts

  def activated_param_count(self) -> int:
    """Weights one token touches: router d*E, k experts of 3*d*f each and
    the shared experts (3*d*(S*f))."""
    d, f = self.d_model, self.expert_dim
    return (d * self.num_experts + self.top_k * 3 * d * f
            + 3 * d * self.num_shared_experts * f)

  def flops_per_token(self) -> int:
    """Forward FLOPs: 2 per multiply-add over every activated weight."""
    return 2 * self.activated_param_count()

  # ----------------------------------------------------------------- forward

  def __call__(self, h: jax.Array) -> jax.Array:
    shape, d = h.shape, h.shape[-1]
    x = h.reshape(-1, d)
    n, e, k = x.shape[0], self.num_experts, self.top_k

    # Router in float32: logits [N, E], probs softmax over all E experts.
    logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = tokens.top_k(probs, k)  # [N, k] each, per device
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)

    # Assignments flattened token-major: a = n * k + j.
    flat_e = experts.reshape(-1)
    flat_w = weights.reshape(-1)
    token = jnp.arange(n * k, dtype=jnp.int32) // k
    counts = jnp.bincount(flat_e, length=e)  # integer: no gradient through f_e
    fraction = counts.astype(jnp.float32) / (n * k)

    if self.capacity_factor > 0:
      y, kept = self._capacity(x, flat_e, flat_w, token)
      dropped = 1.0 - jnp.mean(kept.astype(jnp.float32))
    else:
      y = self._dropless(x, experts, weights)
      dropped = jnp.zeros((), jnp.float32)
    if self.shared is not None:
      y = y + self.shared(x)

    lse = jax.nn.logsumexp(logits, axis=-1)
    self.sow(AuxLoss, "load_balance", load_balance_loss(
        balance_fraction(self, "load_balance", fraction),
        jnp.mean(probs, axis=0), self.load_balance_coef))
    self.sow(AuxLoss, "router_z", self.z_loss_coef * jnp.mean(jnp.square(lse)))
    # Entropy -sum_e p_e log p_e, with log p = logits - lse (safe at p = 0).
    entropy = -jnp.sum(probs * (logits - lse[:, None]), axis=-1)
    sg = jax.lax.stop_gradient
    self.sow(LayerMetric, "expert_load", sg(fraction))
    self.sow(LayerMetric, "router_entropy", sg(jnp.mean(entropy)))
    self.sow(LayerMetric, "dropped_fraction", sg(dropped))
    return y.reshape(shape)

  def _grouped_swiglu(self, xs: jax.Array, group_sizes: jax.Array,
                      w_gate: jax.Array, w_up: jax.Array,
                      w_down: jax.Array) -> jax.Array:
    impl = self.grouped_matmul
    rows, e = xs.shape[0], group_sizes.shape[0]
    if impl == "auto":
      if rows <= LOOP_ROWS_PER_EXPERT * e:   # decoding: few rows per expert
        impl = "loop"
      else:
        impl = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    dt = self.dtype
    if impl == "gather":   # cast after the gather: only the used experts
      return grouped_swiglu_gather(xs, group_sizes, w_gate, w_up, w_down, dt)
    if impl == "loop":     # cast after the slice: only the used experts
      return grouped_swiglu_loop(xs, group_sizes, w_gate, w_up, w_down,
                                 loop_block(rows, e, self.block_size), dt)
    w = (w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))
    if impl == "blocked":
      return grouped_swiglu_blocked(xs, group_sizes, *w, self.block_size)
    return grouped_swiglu_ragged(xs, group_sizes, *w)

  def _dropless(self, x: jax.Array, experts: jax.Array,
                weights: jax.Array) -> jax.Array:
    """Sort the N*k assignments by expert, grouped matmuls, weighted
    scatter-add back: y_n = sum_{a: token(a)=n} w_a Expert_{e_a}(x_n).
    Under a mesh each device does this for its own tokens, exchanging rows
    with the devices that own their experts (parallel/expert_sharding.py)."""
    w = (self.w_gate[...], self.w_up[...], self.w_down[...])
    kw = dict(num_experts=self.num_experts, experts_fn=self._grouped_swiglu)
    if tokens.active_mesh() is not None:
      y = ES.expert_parallel(x, experts, weights, w, **kw)
    else:
      y = ES.dispatch(x, experts, weights, w, **kw)
    return y.astype(self.dtype)

  def _capacity(self, x: jax.Array, flat_e: jax.Array, flat_w: jax.Array,
                token: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Capacity-limited dispatch. Position of assignment a in its expert's
    queue: pos_a = #{a' < a : e_a' = e_a} (token-major order), from a
    cumulative sum of one-hots ([N*k, E], never [N, E, C]); kept iff
    pos_a < C. Returns (y [N, d], kept [N*k])."""
    n, d = x.shape
    e, k, dt = self.num_experts, self.top_k, self.dtype
    cap = max(1, math.ceil(self.capacity_factor * n * k / e))
    onehot = jax.nn.one_hot(flat_e, e, dtype=jnp.int32)
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    kept = pos < cap
    # Dispatch: out-of-range (dropped) slots are discarded by mode="drop".
    buf = jnp.zeros((e, cap, d), dt).at[flat_e, pos].add(x[token], mode="drop")
    g = jnp.einsum("ecd,edf->ecf", buf, self.w_gate[...].astype(dt))
    u = jnp.einsum("ecd,edf->ecf", buf, self.w_up[...].astype(dt))
    yb = jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u,
                    self.w_down[...].astype(dt))
    # Combine: gather each kept assignment's row, zero for dropped ones.
    ya = yb.at[flat_e, pos].get(mode="fill", fill_value=0)
    wa = jnp.where(kept, flat_w, 0.0)
    y = jnp.sum((ya.astype(jnp.float32) * wa[:, None]).reshape(n, k, d), axis=1)
    return y.astype(dt), kept
