"""Sampling helpers of the generators: sizes that fit a length, and
distinct or random tuples of ids from an alphabet."""

from __future__ import annotations

import numpy as np

from ultramem_jax.tasks.space import TaskError

# A size parameter: None (as many as fit), an int (exactly), or an inclusive
# (lo, hi) range drawn uniformly per instance and clipped to what fits.
Size = int | tuple[int, int] | None


def pick_size(spec: Size, hi: int, rng: np.random.Generator, what: str,
              lo: int = 1) -> int:
  """Resolves a :data:`Size` against the most that fits (`hi`).

  Raises TaskError naming `what` when nothing fits or an exact value is
  larger than `hi`.
  """
  if hi < lo:
    raise TaskError(f"{what}: the length is too short for {lo} "
                    f"(at most {max(hi, 0)} fit)")
  if spec is None:
    return hi
  if isinstance(spec, (tuple, list)):
    if len(spec) != 2 or spec[0] > spec[1] or spec[0] < lo:
      raise TaskError(f"{what}={spec!r}: expected an inclusive range (lo, hi) "
                      f"with {lo} <= lo <= hi")
    a, b = int(spec[0]), min(int(spec[1]), hi)
    if b < a:
      raise TaskError(f"{what}={spec!r}: at most {hi} fit in this length")
    return int(rng.integers(a, b + 1))
  spec = int(spec)
  if spec < lo:
    raise TaskError(f"{what}={spec}: must be at least {lo}")
  if spec > hi:
    raise TaskError(f"{what}={spec}: at most {hi} fit in this length")
  return spec


def capacity(alphabet: int, width: int) -> int:
  """How many distinct tuples of `width` tokens an alphabet gives."""
  return alphabet ** width


def distinct_tuples(rng: np.random.Generator, alphabet: np.ndarray, width: int,
                    n: int) -> np.ndarray:
  """`n` distinct tuples of `width` ids from `alphabet`: int32 [n, width]."""
  codes = rng.choice(capacity(len(alphabet), width), size=n, replace=False)
  return alphabet[decode_codes(codes, len(alphabet), width)]


def random_tuples(rng: np.random.Generator, alphabet: np.ndarray, width: int,
                  n: int) -> np.ndarray:
  """`n` tuples of `width` ids drawn uniformly (repeats allowed)."""
  return alphabet[rng.integers(0, len(alphabet), size=(n, width))]


def decode_codes(codes: np.ndarray, base: int, width: int) -> np.ndarray:
  """Integer codes -> [n, width] digits in `base` (most significant first)."""
  codes = np.asarray(codes, np.int64)
  digits = np.empty((len(codes), width), np.int64)
  for j in range(width - 1, -1, -1):
    digits[:, j] = codes % base
    codes = codes // base
  return digits
