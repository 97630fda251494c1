"""This machine's memory-streaming limits, measured: a large copy, a
matrix-vector product, and the rate XLA reaches on a plain dense matmul
[B, d] x [d, f] (float32 weights, the activations in the compute dtype,
multiplied as the model's own dots multiply them: ``model/common.weight_dot``,
which on the CPU leaves float32 weights unrounded under bfloat16 compute),
the limit a decode step of batch B is held to."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.timing import interleave
from ultramem_jax.model.common import weight_dot

COPY_BYTES = 256 << 20
MATMUL_D = 768
MATMUL_F = 40960      # a 126 MB float32 weight matrix, far beyond the caches


@jax.jit
def _scale(a):
  return a * 2.0


@jax.jit
def _dense(x, w):
  return weight_dot(x, w, x.dtype)


def copy_rate(nbytes: int = COPY_BYTES, rounds: int = 5) -> float:
  """Bytes/s of ``a * 2`` over a float32 array of `nbytes` (read + write)."""
  a = jnp.ones((nbytes // 4,), jnp.float32)
  t = interleave({"copy": lambda: _scale(a)}, rounds=rounds, progress=False)
  return 2 * nbytes / t["copy"].median


def matmul_rate(batch: int, dtype: str, d: int = MATMUL_D, f: int = MATMUL_F,
                rounds: int = 5) -> float:
  """Bytes/s of [batch, d] x [d, f]: the float32 weights read plus the
  activations read and written, in `dtype`, per second."""
  key = jax.random.key(batch)
  w = jax.random.normal(key, (d, f), jnp.float32)
  x = jax.random.normal(key, (batch, d), jnp.float32).astype(dtype)
  t = interleave({"matmul": lambda: _dense(x, w)}, rounds=rounds,
                 progress=False)
  item = jnp.dtype(dtype).itemsize
  return (d * f * 4 + batch * (d + f) * item) / t["matmul"].median
