"""The weighted read of value rows, spec section 2, step 6, as pure
functions. This is the operation the Pallas ``value_read`` kernel replaces;
these definitions are its reference.

Shapes: N tokens, S kept slots per token (all heads together), Dv value
width split into hc chunks (multi-core scoring), Dp pre-value width, E value
blocks (implicit value expansion).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def pre_value_products(z: jax.Array, slots: jax.Array,
                       pre_values: jax.Array) -> jax.Array:
  """a_k = <z, P[p_k]>: z [N, Dp], slots [N, S], P [rows, Dp] -> [N, S] f32."""
  rows = jnp.take(pre_values, slots, axis=0).astype(z.dtype)
  return jnp.einsum("nd,nsd->ns", z, rows,
                    preferred_element_type=jnp.promote_types(z.dtype, jnp.float32))


def weighted_value_sum(slots: jax.Array, weights: jax.Array, values: jax.Array,
                       *, blocks: jax.Array | None = None,
                       num_blocks: int = 1, dtype=jnp.float32) -> jax.Array:
  """o[e, chunk c] = sum_k [e_k = e] * weights[k, c] * V[p_k, chunk c].

  slots [N, S] rows p_k; weights [N, S, hc] (a_k * g_c[k], or the softmax
  weights); values [rows, Dv]; blocks [N, S] the value block e_k < E.
  Returns [N, E * Dv] (block-major), accumulated in float32, cast to dtype.
  """
  n, s, hc = weights.shape
  dv = values.shape[-1]
  rows = jnp.take(values, slots, axis=0).astype(dtype).reshape(n, s, hc, dv // hc)
  w = weights.astype(dtype)
  acc = jnp.promote_types(dtype, jnp.float32)
  if num_blocks == 1:
    out = jnp.einsum("nsc,nscd->ncd", w, rows, preferred_element_type=acc)
  else:
    onehot = jax.nn.one_hot(blocks, num_blocks, dtype=dtype)
    out = jnp.einsum("nsc,nse,nscd->necd", w, onehot, rows,
                     preferred_element_type=acc)
  return out.reshape(n, num_blocks * dv).astype(dtype)
