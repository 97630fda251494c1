"""``product_key_topk``: sub-key scores and the top-K pre-filter (spec
section 2, steps 2-3) without writing the token x n score matrix to memory.

For a block of tokens and one (head, side) group the kernel computes the r
per-rank score rows S_i = q_i K_i^T ([tokens, n], in VMEM / registers), the
pre-filter a = sum_i u_i S_i, and then K rounds of max-and-mask: each round
takes the row maximum of a, its lowest column index (``lax.top_k``'s tie
rule), reads the r per-rank scores at that column through a one-hot mask and
masks the column out. ``lax.top_k`` and sorts do not lower inside a TPU
kernel; K rounds of O(n) vector work do, on both backends. Only
[tokens, K] indices and [tokens, K, r] scores leave the kernel.

The backward pass (``jax.custom_vjp``) is plain XLA: the cotangent of the
kept scores is scattered into a [tokens, n, r] matrix and multiplied by the
keys and queries (two matmuls, what autodiff of the reference does too).
Indices and the pre-filter vector u get no gradient, as in the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

from pallas_kernels.backend import (interpret_arg, next_pow2, pad_axis,
                                    resolve, round_up)


def _topk_kernel(q_ref, k_ref, u_ref, idx_ref, sc_ref, *, k: int, n_valid: int):
  """q_ref [r, bt, Dk], k_ref [r, n, Dk], u_ref [1, r] -> idx_ref [bt, k],
  sc_ref [r, bt, k]."""
  r = q_ref.shape[0]
  s = [jax.lax.dot_general(q_ref[i], k_ref[i], (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
       for i in range(r)]
  bt, n = s[0].shape
  a = s[0] * u_ref[0, 0].astype(jnp.float32)
  for i in range(1, r):
    a = a + s[i] * u_ref[0, i].astype(jnp.float32)
  col = jax.lax.broadcasted_iota(jnp.int32, (bt, n), 1)
  a = jnp.where(col < n_valid, a, -jnp.inf)   # padded keys are never picked
  kcol = jax.lax.broadcasted_iota(jnp.int32, (bt, k), 1)

  def round_(j, carry):
    a, idx, sc = carry
    top = jnp.max(a, axis=1, keepdims=True)
    pick = jnp.min(jnp.where(a == top, col, n), axis=1, keepdims=True)
    hit = col == pick
    here = kcol == j
    idx = jnp.where(here, pick, idx)
    sc = tuple(jnp.where(here, jnp.sum(jnp.where(hit, s[i], 0.0), axis=1,
                                       keepdims=True), sc[i])
               for i in range(r))
    return jnp.where(hit, -jnp.inf, a), idx, sc

  init = (a, jnp.zeros((bt, k), jnp.int32),
          tuple(jnp.zeros((bt, k), jnp.float32) for _ in range(r)))
  _, idx, sc = jax.lax.fori_loop(0, k, round_, init)
  idx_ref[...] = idx
  for i in range(r):
    sc_ref[i] = sc[i]


def _topk_call(q, keys, u, *, k: int, backend: str, interpret: bool,
               block_tokens: int):
  """Kernel layouts: q [G, N, r, Dk], keys [G, n, r, Dk], u [G, r] ->
  idx [G, N, k], scores [G, N, k, r] (f32)."""
  g, n_tok, r, dk = q.shape
  n = keys.shape[1]
  if backend == "triton":   # every array a power of two; padding masked
    bt = next_pow2(block_tokens)
    n_pad, r_pad, dk_pad, k_pad = next_pow2(n), next_pow2(r), next_pow2(dk), next_pow2(k)
    params = pltr.CompilerParams(num_warps=4, num_stages=1)
  else:                      # (8, 128) tiles
    bt = round_up(block_tokens, 8)
    n_pad, r_pad, dk_pad, k_pad = round_up(n, 128), r, dk, k
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  n_tok_pad = round_up(n_tok, bt)
  qt = jnp.transpose(q, (0, 2, 1, 3))                     # [G, r, N, Dk]
  qt = pad_axis(pad_axis(pad_axis(qt, 1, r_pad), 2, n_tok_pad), 3, dk_pad)
  kt = jnp.transpose(keys, (0, 2, 1, 3))                  # [G, r, n, Dk]
  kt = pad_axis(pad_axis(pad_axis(kt, 1, r_pad), 2, n_pad), 3, dk_pad)
  ut = pad_axis(u, 1, r_pad)[:, None, :]                  # [G, 1, r]
  kernel = functools.partial(_topk_kernel, k=k_pad, n_valid=n)
  idx, sc = pl.pallas_call(
      kernel,
      grid=(g, n_tok_pad // bt),
      in_specs=[pl.BlockSpec((None, r_pad, bt, dk_pad), lambda h, i: (h, 0, i, 0)),
                pl.BlockSpec((None, r_pad, n_pad, dk_pad), lambda h, i: (h, 0, 0, 0)),
                pl.BlockSpec((None, 1, r_pad), lambda h, i: (h, 0, 0))],
      out_specs=[pl.BlockSpec((None, bt, k_pad), lambda h, i: (h, i, 0)),
                 pl.BlockSpec((None, r_pad, bt, k_pad), lambda h, i: (h, 0, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((g, n_tok_pad, k_pad), jnp.int32),
                 jax.ShapeDtypeStruct((g, r_pad, n_tok_pad, k_pad), jnp.float32)],
      interpret=interpret_arg(backend, interpret),
      compiler_params=params,
      name="product_key_topk",
  )(qt, kt, ut)
  idx = idx[:, :n_tok, :k]
  sc = jnp.transpose(sc[:, :r, :n_tok, :k], (0, 2, 3, 1))
  return idx, sc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _topk(q, keys, u, k, backend, interpret, block_tokens):
  return _topk_call(q, keys, u, k=k, backend=backend, interpret=interpret,
                    block_tokens=block_tokens)


def _topk_fwd(q, keys, u, k, backend, interpret, block_tokens):
  out = _topk_call(q, keys, u, k=k, backend=backend, interpret=interpret,
                   block_tokens=block_tokens)
  return out, (q, keys, u, out[0])


def _topk_bwd(k, backend, interpret, block_tokens, res, cts):
  del k, backend, interpret, block_tokens
  q, keys, u, idx = res
  _, d_scores = cts                                        # [G, N, k, r]
  g, n_tok, r, _ = q.shape
  n = keys.shape[1]
  gi = jnp.arange(g)[:, None, None]
  ti = jnp.arange(n_tok)[None, :, None]
  d_s = jnp.zeros((g, n_tok, n, r), jnp.float32).at[gi, ti, idx].add(
      d_scores.astype(jnp.float32))                        # [G, N, n, r]
  dq = jnp.einsum("gtji,gjid->gtid", d_s, keys.astype(jnp.float32))
  dk = jnp.einsum("gtji,gtid->gjid", d_s, q.astype(jnp.float32))
  return dq.astype(q.dtype), dk.astype(keys.dtype), jnp.zeros_like(u)


_topk.defvjp(_topk_fwd, _topk_bwd)


def product_key_topk(q: jax.Array, keys: jax.Array, u: jax.Array, k: int, *,
                     backend: str | None = None, interpret: bool = False,
                     block_tokens: int = 8) -> tuple[jax.Array, jax.Array]:
  """Top-k keys of the rank-1 pre-filter and their per-rank scores.

  Same contract as :func:`pallas_kernels.reference.product_key_topk_reference`:
  q [G, N, r, Dk], keys [G, n, r, Dk], u [G, r] -> idx [G, N, k] int32 and
  scores [G, N, k, r] float32 (differentiable in q and keys). G counts
  (head, side) pairs. ``backend``: ``tpu`` or ``triton`` (default: the
  default device's); ``interpret`` runs it in the Pallas interpreter.
  """
  if not 1 <= k <= keys.shape[1]:
    raise ValueError(f"product_key_topk: k={k} must be in [1, n={keys.shape[1]}]")
  if q.shape[0] != keys.shape[0] or q.shape[2:] != keys.shape[2:]:
    raise ValueError(f"product_key_topk: q {q.shape} and keys {keys.shape} "
                     "must agree in G, r and Dk")
  return _topk(q, keys, u, k, resolve(backend), interpret, block_tokens)
