"""Product-key retrieval, spec section 2, steps 1-5, as pure functions.

Shapes: N tokens, H heads, ns keys per side, r Tucker rank, Dk key width,
hc cores, K pre-filter width, m kept slots per head. Scores are float32.
Indices carry no gradient; gradients reach queries, keys and cores through
the kept scores only (step 4).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ultramem_jax.model.common import acc_dtype, keeps_float32_weights, rms_norm


# --------------------------------------------------------------------------
# Steps 1-2: queries and sub-key scores
# --------------------------------------------------------------------------


def queries(h: jax.Array, w_q: jax.Array, scale: jax.Array, eps: float, *,
            heads: int, per_rank: bool) -> tuple[jax.Array, jax.Array]:
  """Step 1. h [N, d], w_q [d, Hq, 2, r, Dk] -> (q_row, q_col), each
  [N, H, r, Dk]: QueryNorm(reshape(Wq h, [2, r, Dk])) per query head.

  ``per_rank=False`` is the released code: q[0, 0] is the row query and
  q[0, 1] the column query of every rank (q[1, :] is computed, never read).
  With one query head shared by H heads (UltraMem v1) it is broadcast.
  """
  if keeps_float32_weights(w_q.dtype, h.dtype):   # see common.weight_dot
    h = h.astype(jnp.float32)
  q = jnp.einsum("nd,dqsrk->nqsrk", h, w_q.astype(h.dtype),
                 preferred_element_type=acc_dtype(h.dtype))
  q = rms_norm(q, scale, eps)
  r = q.shape[3]
  if per_rank:
    q_row, q_col = q[:, :, 0], q[:, :, 1]
  else:
    shape = q.shape[:2] + (r, q.shape[-1])
    q_row = jnp.broadcast_to(q[:, :, 0, 0:1], shape)
    q_col = jnp.broadcast_to(q[:, :, 0, 1:2], shape)
  if q_row.shape[1] != heads:
    shape = (q.shape[0], heads) + q_row.shape[2:]
    q_row, q_col = jnp.broadcast_to(q_row, shape), jnp.broadcast_to(q_col, shape)
  return q_row, q_col


def subkey_scores(q_row: jax.Array, q_col: jax.Array, keys: jax.Array,
                  scale: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Step 2. keys [H, 2, ns, Dk, r] are KeyNorm-ed over Dk; returns
  S_row[N, H, ns, r] = <q_row[t], Kn[0, j, :, t]> and S_col likewise.

  The keys are moved to [H, 2, r, ns, Dk] first, so that the norm reduces
  over the contiguous axis and the rank is a leading batch axis of the
  dots: in the stored layout XLA:CPU reduces over a strided axis and
  copies the normalised keys again for the dots (a decode step at batch 1
  spent 0.39 ms per layer here, 0.24 ms after; same values up to the
  order of the float32 sums)."""
  kn = rms_norm(jnp.moveaxis(keys, 4, 2), scale, eps, axis=-1)  # [H, 2, r, ns, Dk]
  s_row = jnp.einsum("nhrk,hrjk->nhjr", q_row, kn[:, 0])
  s_col = jnp.einsum("nhrk,hrjk->nhjr", q_col, kn[:, 1])
  return s_row, s_col


# --------------------------------------------------------------------------
# Step 3: the rank-1 pre-filter (TDQKR) and the Tucker vectors u, v
# --------------------------------------------------------------------------


def prefilter_scores(s_row: jax.Array, s_col: jax.Array, u: jax.Array | None,
                     v: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """a_j = sum_t u_t S_row[j, t], b_j = sum_t v_t S_col[j, t] ([N, H, ns]);
  with u = v = None (``score: sum``, r = 1) a = S_row, b = S_col."""
  if u is None:
    return s_row[..., 0], s_col[..., 0]
  a = jnp.einsum("nhjr,hr->nhj", s_row, u.astype(s_row.dtype))
  b = jnp.einsum("nhjr,hr->nhj", s_col, v.astype(s_col.dtype))
  return a, b


def leading_singular_vectors(cores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """cores [hc, H, r, r] -> (u [H, r], v [H, r], singular values [H, r],
  descending) of the summed core C_1 + ... + C_hc."""
  c = jnp.sum(cores.astype(acc_dtype(cores.dtype)), axis=0)
  left, sv, right_t = jnp.linalg.svd(c)
  return left[..., :, 0], right_t[..., 0, :], sv


def align_signs(u: jax.Array, v: jax.Array, u_prev: jax.Array,
                v_prev: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The sign rule: flip (u, v) together when (-u, -v) is closer in L1 to
  the previous vectors (per head); keep them on a tie."""
  pos = jnp.sum(jnp.abs(u - u_prev), -1) + jnp.sum(jnp.abs(v - v_prev), -1)
  neg = jnp.sum(jnp.abs(-u - u_prev), -1) + jnp.sum(jnp.abs(-v - v_prev), -1)
  sign = jnp.where(neg < pos, -1.0, 1.0)[:, None]
  return u * sign, v * sign


def core_penalty(cores: jax.Array, tau: float) -> jax.Array:
  """1/(r-1) * sum over heads and i >= 2 of relu(lambda_i - tau)**2 (lambda:
  singular values of the summed core); multiply by alpha."""
  r = cores.shape[-1]
  if r < 2:
    return jnp.zeros((), jnp.float32)
  sv = jnp.linalg.svd(jnp.sum(cores.astype(acc_dtype(cores.dtype)), axis=0),
                      compute_uv=False)
  return jnp.sum(jnp.square(jax.nn.relu(sv[..., 1:] - tau))) / (r - 1)


def pick_fraction(top: jax.Array, ns: int) -> jax.Array:
  """f [ns]: the fraction of the top-K picks `top` [N, H, K] of each key."""
  return jnp.bincount(top.reshape(-1), length=ns).astype(jnp.float32) / top.size


def key_balance_loss(a: jax.Array, top: jax.Array,
                     fraction: jax.Array | None = None) -> jax.Array:
  """ns * sum_j f_j p_j for one side: p the mean softmax of the pre-filter
  scores a [N, H, ns], f the fraction of the top-K picks `top` [N, H, K]
  (or `fraction`, given: the whole batch's under gradient accumulation)."""
  ns = a.shape[-1]
  p = jnp.mean(jax.nn.softmax(a, axis=-1).reshape(-1, ns), axis=0)
  f = pick_fraction(top, ns) if fraction is None else fraction
  return ns * jnp.sum(f * p)


# --------------------------------------------------------------------------
# Step 4: exact re-scoring of the K x K grid and top-m
# --------------------------------------------------------------------------


class Retrieved(NamedTuple):
  rows: jax.Array         # [N, H, m] row key i of each kept pair (int32)
  cols: jax.Array         # [N, H, m] column key j
  core_scores: jax.Array  # [N, H, m, hc] g_c at the kept pairs (differentiable)
  scores: jax.Array       # [N, H, m] g = sum_c g_c, descending


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [N, H, A, r], idx [N, H, B] -> x[n, h, idx[n, h, b]] [N, H, B, r]."""
  return jnp.take_along_axis(x, idx[..., None], axis=2)


def top_k_keys(a: jax.Array, s: jax.Array, k: int,
               top_k=jax.lax.top_k) -> tuple[jax.Array, jax.Array]:
  """The K keys of largest pre-filter score a [N, H, ns] (no gradient) and
  their per-rank sub-key scores s [N, H, ns, r] -> ([N, H, K], [N, H, K, r]).
  ``pallas_kernels.product_key_topk`` fuses this with step 2. ``top_k``:
  lax.top_k or a token-sharded equivalent."""
  _, top = top_k(jax.lax.stop_gradient(a), k)
  return top, _take(s, top)


def grid_top_m(r_sel: jax.Array, c_sel: jax.Array, top_rows: jax.Array,
               top_cols: jax.Array, cores: jax.Array | None, m: int,
               top_k=jax.lax.top_k) -> Retrieved:
  """Scores every pair (i in I, j in J) of the kept keys, whose per-rank
  scores are r_sel = S_row[I], c_sel = S_col[J] ([N, H, K, r]): g_c =
  S_row[i]^T C_c S_col[j] (``cores`` [hc, H, r, r]), or g = S_row[i] +
  S_col[j] when ``cores`` is None; keeps the m pairs of largest g = sum_c
  g_c. The K x K grid is only ranked (no gradient); the kept pairs' g_c are
  recomputed from their rows and columns, so the gradient reaches S_row,
  S_col and C_c through them."""
  k = top_rows.shape[-1]
  sg = jax.lax.stop_gradient
  if cores is None:
    grid = sg(r_sel[..., :, None, 0] + c_sel[..., None, :, 0])
  else:
    grid = jnp.einsum("nhir,hrs,nhjs->nhij", sg(r_sel),
                      sg(jnp.sum(cores.astype(r_sel.dtype), axis=0)), sg(c_sel))
  _, flat = top_k(grid.reshape(grid.shape[:2] + (k * k,)), m)
  ii, jj = flat // k, flat % k
  r_kept, c_kept = _take(r_sel, ii), _take(c_sel, jj)  # [N, H, m, r]
  if cores is None:
    core_scores = (r_kept[..., 0] + c_kept[..., 0])[..., None]
  else:
    core_scores = jnp.einsum("nhmr,chrs,nhms->nhmc", r_kept,
                             cores.astype(r_kept.dtype), c_kept)
  rows = jnp.take_along_axis(top_rows, ii, axis=2)
  cols = jnp.take_along_axis(top_cols, jj, axis=2)
  return Retrieved(rows, cols, core_scores, jnp.sum(core_scores, axis=-1))


# --------------------------------------------------------------------------
# Step 5: slot addressing
# --------------------------------------------------------------------------


def addresses(rows: jax.Array, cols: jax.Array, perm: jax.Array, *,
              keys_per_side: int, rows_per_block: int, offset: int = 0,
              table_rows: int | None = None,
              block_slots: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Virtual slot s = i * ns + j, q = pi[s]. Returns (physical row p, value
  block e, window-local row q mod rows_per_block).

  Own table: p = q mod n*n, e = q div (X*X*n*n) (``block_slots``, n*n
  without key expansion; E > 1 is UltraMem v1's implicit value expansion).
  Shared ring (``table_rows`` given): p = ((q mod R) + offset) mod
  table_rows, e = 0. With key expansion X the X*X virtual slots that share
  a row and a value block fold onto that row (the "fold": q mod R), and
  their weighted values add up in block e.
  """
  q = perm[rows * keys_per_side + cols]
  local = q % rows_per_block
  if table_rows is not None:
    return (local + offset) % table_rows, jnp.zeros_like(q), local
  return local, q // (block_slots or rows_per_block), local
