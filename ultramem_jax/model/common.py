"""Building blocks shared by every layer: initialisers, RMSNorm, dtypes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.model.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float64": jnp.float64}[name]


def linear_std(cfg: ModelConfig) -> float:
  """Std of every linear layer (spec, Initialisation): sqrt(2 / (5 d))."""
  return math.sqrt(2.0 / (5.0 * cfg.d_model))


def output_std(cfg: ModelConfig) -> float:
  """Std of output projections: linear_std / sqrt(2 L)."""
  return linear_std(cfg) / math.sqrt(2.0 * cfg.n_layers)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...],
          names: tuple[str | None, ...], dtype, **metadata) -> nnx.Param:
  """A parameter created already carrying its logical axis names; extra
  metadata (e.g. ``param_group="values"``) travels with the variable."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match shape {shape}")
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype),
                   **metadata)


def normal_param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...],
                 names: tuple[str | None, ...], dtype, **metadata) -> nnx.Param:
  return param(rngs, nnx.initializers.normal(std), shape, names, dtype,
               **metadata)


class AuxLoss(nnx.Intermediate):
  """A scalar a layer sows (``self.sow(AuxLoss, name, value)``) to be added
  to the training loss; the train step pops, sums and logs them by name."""


class LayerMetric(nnx.Intermediate):
  """A value a layer sows for logging only (no gradient is taken through it):
  a scalar, or a vector such as per-expert load. Every one is a mean over
  the batch's tokens or a function of the parameters, so the mean over
  equal microbatches is the whole batch's (training/accumulate.py)."""


class RmsRatio(nnx.Intermediate):
  """A logged ratio rms(a) / rms(b) of two activations, sown as the two
  mean squares [2] (:func:`sow_rms_ratio`): the train step divides after
  combining microbatches, so the ratio is the whole batch's, not a mean of
  ratios. Logged with the LayerMetrics under its own name."""


class BalanceFraction(nnx.Intermediate):
  """The batch fraction f (no gradient) that a balance loss c * sum f p
  multiplies (:func:`balance_fraction`). Sown so that gradient
  accumulation can collect the whole batch's f in a forward pass first."""


class WholeBatchFraction(nnx.Variable):
  """The whole batch's :class:`BalanceFraction`, set on the layer by the
  train step while it runs one microbatch (training/accumulate.py)."""


def whole_batch_attribute(name: str) -> str:
  """The attribute under which a layer finds the whole batch's fraction
  sown as `name`."""
  return f"{name}_whole_batch"


def balance_fraction(module: nnx.Module, name: str,
                     local: jax.Array) -> jax.Array:
  """The fraction a balance loss should use: `local` (this batch's), or
  the whole batch's when the train step supplied it because `local` is a
  microbatch's. The balance losses c * sum_e f_e p_e are linear in the
  token mean p but not in f, so k microbatches equal one batch only with
  the whole batch's f. Sows `local` as BalanceFraction ``<name>_fraction``."""
  sown = f"{name}_fraction"
  module.sow(BalanceFraction, sown, local)
  supplied = getattr(module, whole_batch_attribute(sown), None)
  return local if supplied is None else supplied[...]


def sow_rms_ratio(module: nnx.Module, name: str, a: jax.Array,
                  b: jax.Array) -> None:
  """Sows rms(a) / rms(b) as an :class:`RmsRatio` (see there)."""
  ms = lambda x: jnp.mean(jnp.square(x.astype(jnp.float32)))
  module.sow(RmsRatio, name, jax.lax.stop_gradient(jnp.stack([ms(a), ms(b)])))


def rms_ratio(mean_squares: jax.Array) -> jax.Array:
  """rms(a) / rms(b) from the mean squares [..., 2] an RmsRatio holds."""
  return (jnp.sqrt(mean_squares[..., 0])
          / jnp.maximum(jnp.sqrt(mean_squares[..., 1]), 1e-30))


def acc_dtype(dtype) -> jnp.dtype:
  """Norms and scores are computed in float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def keeps_float32_weights(weight_dtype, dtype) -> bool:
  """Whether :func:`weight_dot` multiplies float32 weights unrounded: on the
  CPU backend, with bfloat16 compute over float32 weights."""
  return (jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.bfloat16
          and jnp.dtype(weight_dtype) == jnp.float32)


def weight_dot(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """x @ w in the compute dtype, for a stored weight w: w cast to `dtype`
  first (a bfloat16 weight, a bfloat16 result).

  On the CPU backend, with bfloat16 compute over float32 weights, the
  weights are not rounded: x (bfloat16) times the float32 w, summed in
  float32, rounded to bfloat16. XLA:CPU has no bfloat16 dot; it converts
  both operands to float32 and multiplies in float32, so the cast only adds
  two passes over the weights (a bfloat16 copy, then its float32 copy) to
  the dot's own: 3.5x the float32 time of a decode step's dense FFN. The
  result differs from the cast one by the weights' own rounding (relative
  2**-9 per weight) and is the more exact of the two."""
  return (x @ compute_weight(w, dtype)).astype(dtype)


def compute_weight(w: jax.Array, dtype) -> jax.Array:
  """A stored weight as the dots of :func:`weight_dot` take it: cast to the
  compute dtype, or left in float32 where ``keeps_float32_weights`` (jnp
  then promotes the bfloat16 operand, exactly, to float32)."""
  return w if keeps_float32_weights(w.dtype, dtype) else w.astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, axis: int = -1) -> jax.Array:
  """x / rms(x) * scale over `axis`, in float32 (or wider)."""
  x = x.astype(acc_dtype(x.dtype))
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)
  shape = [1] * x.ndim
  shape[axis] = -1
  return x * inv * scale.astype(x.dtype).reshape(shape)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.dtype = dtype_of(cfg.dtype)
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",),
                       dtype_of(cfg.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)
