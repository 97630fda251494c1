"""Which Pallas backend runs a kernel, and the padding each one needs.

``tpu``: Mosaic TPU (manual DMA of gathered rows, scalar indices in SMEM).
``triton``: the Pallas Triton backend for NVIDIA GPUs (vector gather loads;
every array a kernel touches must have power-of-two dimensions, so the
wrappers pad and mask). Mosaic GPU, Pallas's default GPU backend, is not
used: these kernels are gathers of single rows, which Triton expresses as
one vector load, and Mosaic GPU's lowering rejected them ("Only copies
transferring a number of bytes divisible by the warpgroup size are
supported" for the small per-group blocks).

On a machine with neither (the CPU), a kernel runs only in interpret mode,
which the tests use; the model's ``kernels: auto`` picks the pure-JAX path
there instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("tpu", "triton")


def default_backend() -> str:
  """The Pallas backend for the default JAX device (``tpu`` on CPU, where
  kernels can only be interpreted and the TPU kernels are the ones tested
  most)."""
  return "triton" if jax.default_backend() == "gpu" else "tpu"


def resolve(backend: str | None) -> str:
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"Pallas backend must be one of {BACKENDS}, got {backend!r}")
  return backend


def interpret_arg(backend: str, interpret: bool):
  """The ``interpret=`` argument of pallas_call: TPU kernels with DMAs and
  semaphores need the TPU interpreter; NaN-filled scratch catches reads of
  rows that were never copied."""
  if not interpret:
    return False
  if backend == "tpu":
    return pltpu.InterpretParams(uninitialized_memory="nan")
  return True


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads `x` along `axis` to `size` with `value` (no-op when equal)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)
