"""Pure-JAX references for the kernels: plain gathers, einsums and
``lax.top_k``, written for clarity, not speed. Every kernel is tested
against these (values and gradients, through ordinary autodiff).

They are also the one definition of step 6 (the weighted read of value
rows) and of the pre-value activations: the memory layer's XLA path calls
:func:`pre_value_products` and :func:`weighted_value_sum` directly, and the
host-memory read (``model/memory/host_read.py``) their halves after the
gather, :func:`pre_value_dot` and :func:`weighted_rows_sum`.

Shapes: N tokens, S kept slots per token (all heads together), Dv value
width split into hc chunks (multi-core scoring), Dp pre-value width, E value
blocks (implicit value expansion).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def gelu_exact(x: jax.Array) -> jax.Array:
  """x * Phi(x) with the error function: the released code's ``F.gelu``.
  Written with ``lax.erf`` (which Mosaic lowers) rather than
  ``jax.nn.gelu(approximate=False)``, whose ``erfc`` no kernel backend lowers."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


# "gelu" is the tanh approximation; "gelu_exact" the erf form.
ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": gelu_exact,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def _erf_from_exp(x: jax.Array) -> jax.Array:
  """erf within 1.5e-7 (Abramowitz and Stegun 7.1.26), from exp and a
  polynomial only: about float32's rounding, for kernels whose backend
  lowers no erf (Triton)."""
  ax = jnp.abs(x)
  t = 1.0 / (1.0 + 0.3275911 * ax)
  poly = t * (0.254829592 + t * (-0.284496736 + t * (
      1.421413741 + t * (-1.453152027 + t * 1.061405429))))
  y = 1.0 - poly * jnp.exp(-ax * ax)
  return jnp.where(x < 0, -y, y)


# The activations as the Triton kernel body computes them (float32):
# the same table, with erf built from exp.
TRITON_ACTIVATIONS = {
    **ACTIVATIONS,
    "gelu_exact": lambda x: 0.5 * x * (1.0 + _erf_from_exp(x * math.sqrt(0.5))),
}


def pre_value_dot(z: jax.Array, rows: jax.Array) -> jax.Array:
  """a_k = <z, P[p_k]> of rows already read: z [N, Dp], rows [N, S, Dp] ->
  [N, S] f32."""
  return jnp.einsum("nd,nsd->ns", z, rows.astype(z.dtype),
                    preferred_element_type=jnp.promote_types(z.dtype, jnp.float32))


def pre_value_products(z: jax.Array, slots: jax.Array,
                       pre_values: jax.Array) -> jax.Array:
  """a_k = <z, P[p_k]>: z [N, Dp], slots [N, S], P [rows, Dp] -> [N, S] f32."""
  return pre_value_dot(z, jnp.take(pre_values, slots, axis=0))


def weighted_rows_sum(rows: jax.Array, weights: jax.Array, *,
                      blocks: jax.Array | None = None, num_blocks: int = 1,
                      onehot: jax.Array | None = None,
                      dtype=jnp.float32) -> jax.Array:
  """The weighted sum of :func:`weighted_value_sum` over rows already read:
  rows [N, S, Dv] (V[p_k]), weights [N, S, hc], blocks [N, S] (or their
  one-hots [N, S, E], given where ``one_hot`` cannot run) -> [N, E * Dv]."""
  n, s, hc = weights.shape
  dv = rows.shape[-1]
  rows = rows.astype(dtype).reshape(n, s, hc, dv // hc)
  w = weights.astype(dtype)
  acc = jnp.promote_types(dtype, jnp.float32)
  if num_blocks == 1 and onehot is None:
    out = jnp.einsum("nsc,nscd->ncd", w, rows, preferred_element_type=acc)
  else:
    if onehot is None:
      onehot = jax.nn.one_hot(blocks, num_blocks, dtype=dtype)
    out = jnp.einsum("nsc,nse,nscd->necd", w, onehot.astype(dtype), rows,
                     preferred_element_type=acc)
  return out.reshape(n, -1).astype(dtype)


def weighted_value_sum(slots: jax.Array, weights: jax.Array, values: jax.Array,
                       *, blocks: jax.Array | None = None,
                       num_blocks: int = 1, dtype=jnp.float32) -> jax.Array:
  """o[e, chunk c] = sum_k [e_k = e] * weights[k, c] * V[p_k, chunk c].

  slots [N, S] rows p_k; weights [N, S, hc] (a_k * g_c[k], or the softmax
  weights); values [rows, Dv]; blocks [N, S] the value block e_k < E.
  Returns [N, E * Dv] (block-major), accumulated in float32, cast to dtype.
  """
  return weighted_rows_sum(jnp.take(values, slots, axis=0), weights,
                           blocks=blocks, num_blocks=num_blocks, dtype=dtype)


def product_key_topk_reference(q: jax.Array, keys: jax.Array, u: jax.Array,
                               k: int) -> tuple[jax.Array, jax.Array]:
  """Spec steps 2-3 for G independent (head, side) groups.

  q [G, N, r, Dk] queries per rank, keys [G, n, r, Dk] (already KeyNorm-ed),
  u [G, r] the pre-filter vector. S[g, t, j, i] = <q[g, t, i], keys[g, j, i]>;
  the pre-filter score is a = sum_i u_i S[..., i]. Returns the top-k keys of
  a per token, idx [G, N, k] (descending, lowest index first on ties), and
  their per-rank scores S at those keys, [G, N, k, r] (differentiable).
  """
  s = jnp.einsum("gtik,gjik->gtji", q, keys, preferred_element_type=jnp.float32)
  a = jnp.einsum("gtji,gi->gtj", jax.lax.stop_gradient(s), u.astype(jnp.float32))
  _, idx = jax.lax.top_k(a, k)
  return idx, jnp.take_along_axis(s, idx[..., None], axis=2)


def value_read_reference(slots: jax.Array, weights: jax.Array,
                         values: jax.Array, *, z: jax.Array | None = None,
                         pre_values: jax.Array | None = None,
                         activation: str = "none",
                         blocks: jax.Array | None = None, num_blocks: int = 1,
                         dtype=jnp.float32) -> jax.Array:
  """Spec step 6 for N tokens reading S rows each.

  slots [N, S] rows p; weights [N, S, hc] per-core scores g_c; values
  [R, Dv] (Dv split into hc column chunks); optional pre-values: z [N, Dp],
  pre_values [R, Dp], so that w = g_c * act(<z, P[p]>); optional value blocks
  [N, S] < num_blocks (implicit value expansion). Returns o [N, E * Dv]
  with o[t, e, chunk c] = sum_s [e_s = e] w[t, s, c] V[p_ts, chunk c],
  accumulated in float32 and cast to `dtype`.
  """
  w = weights.astype(jnp.float32)
  if pre_values is not None:
    a = pre_value_products(z.astype(jnp.float32), slots, pre_values)
    w = w * ACTIVATIONS[activation](a)[..., None]
  out = weighted_value_sum(slots, w, values, blocks=blocks,
                           num_blocks=num_blocks, dtype=jnp.float32)
  return out.astype(dtype)
