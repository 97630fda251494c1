"""Pure-JAX references for the kernels: plain gathers, einsums and
``lax.top_k``, written for clarity, not speed. Every kernel is tested
against these (values and gradients, through ordinary autodiff)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


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
  n, s, hc = weights.shape
  dv = values.shape[1]
  w = weights.astype(jnp.float32)
  if pre_values is not None:
    a = jnp.einsum("nd,nsd->ns", z.astype(jnp.float32),
                   pre_values[slots].astype(jnp.float32))
    w = w * ACTIVATIONS[activation](a)[..., None]
  rows = values[slots].astype(jnp.float32).reshape(n, s, hc, dv // hc)
  if blocks is None:
    blocks = jnp.zeros_like(slots)
  onehot = jax.nn.one_hot(blocks, num_blocks, dtype=jnp.float32)
  out = jnp.einsum("nsc,nse,nscd->necd", w, onehot, rows)
  return out.reshape(n, num_blocks * dv).astype(dtype)
