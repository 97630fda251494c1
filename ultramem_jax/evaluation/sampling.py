"""Choosing the next token from logits: greedy, temperature and top-p.

Pure functions of (keys, logits); `temperature` and `top_p` are Python
floats, fixed when a sampling step is traced (greedy compiles no draw,
top_p = 1 no nucleus). Their ranges are checked by the caller.

- temperature 0: greedy, the argmax (the lowest id among ties);
- temperature T > 0: a draw from softmax(logits / T);
- top_p p < 1 (nucleus sampling): the draw is restricted to the smallest
  set of most probable tokens whose probabilities sum to at least p (after
  the temperature); the most probable token is always in it, so p -> 0 is
  greedy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus(logits: jax.Array, top_p: float) -> jax.Array:
  """[..., V] bool: the top-p nucleus of softmax(logits) over the last axis.

  Rank tokens by probability, ties by id (as argmax breaks them); a token
  is in the nucleus when the tokens ranked above it sum to less than
  `top_p`, and the first always is. Computed without sorting (a sort of V
  entries per row is what costs on a CPU): with S(q) the mass of tokens
  more probable than q, the nucleus is every token more probable than
  tau = the least probability with S(tau) < top_p, found by bisection on
  the float bits (S is monotone), plus the tokens equal to tau whose
  lower-id ties keep the sum below top_p.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  above = lambda q: jnp.sum(jnp.where(probs > q[..., None], probs, 0.0), axis=-1)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)  # monotone for x >= 0

  def halve(_, interval):
    lo, hi = interval                 # S(hi) < top_p; S(lo) >= top_p or lo = 0
    mid = lo + (hi - lo) // 2
    ok = above(jax.lax.bitcast_convert_type(mid, jnp.float32)) < top_p
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  hi = bits(jnp.max(probs, axis=-1))
  _, hi = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(hi), hi))
  tau = jax.lax.bitcast_convert_type(hi, jnp.float32)[..., None]
  tied = jnp.where(probs == tau, probs, 0.0)
  before = jnp.cumsum(tied, axis=-1) - tied        # lower-id ties' mass
  keep = (probs > tau) | ((probs == tau)
                          & (above(tau[..., 0])[..., None] + before < top_p))
  first = jnp.arange(probs.shape[-1]) == jnp.argmax(probs, axis=-1)[..., None]
  return keep | first


def sample(keys: jax.Array, logits: jax.Array, temperature: float,
           top_p: float = 1.0) -> jax.Array:
  """[B] int32 token ids from logits [B, V], row b drawn with keys[b]
  (see the module docstring)."""
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1:
    logits = jnp.where(nucleus(logits, top_p), logits, -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def step_keys(seed_key: jax.Array, rows: jax.Array,
              positions: jax.Array) -> jax.Array:
  """[B] keys for drawing the token at `positions` [B] of prompts `rows` [B]:
  a draw depends on the seed, the prompt's index and the position only (not
  on the batch it is in or its padding)."""
  fold = jax.random.fold_in
  return jax.vmap(lambda r, p: fold(fold(seed_key, r), p))(rows, positions)
