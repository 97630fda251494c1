"""The FFN slot: a registry of layer kinds chosen by ``model.ffn.kind``.

Every kind is a module built as ``cls(cfg, layer_index, rngs=rngs)`` and
called as ``y = layer(h)`` on the block's normalised input ``h`` [B, T, d].
Later kinds (``moe``, the memory layers) register themselves here; the
Transformer block never changes.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from ultramem_jax.model.common import (dtype_of, linear_std, normal_param,
                                       output_std, weight_dot)
from ultramem_jax.model.config import ModelConfig

FFN_KINDS: dict[str, Callable[..., nnx.Module]] = {}


def register_ffn(kind: str):
  def wrap(cls):
    FFN_KINDS[kind] = cls
    return cls
  return wrap


def build_ffn(cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs) -> nnx.Module:
  try:
    cls = FFN_KINDS[cfg.ffn.kind]
  except KeyError:
    raise ValueError(f"model.ffn.kind: got {cfg.ffn.kind!r}; registered kinds "
                     f"are {sorted(FFN_KINDS)}") from None
  return cls(cfg, layer_index, rngs=rngs)


@register_ffn("dense")
class SwiGLU(nnx.Module):
  """y = W_down (silu(W_gate h) * W_up h)."""

  def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs,
               inner_dim: int | None = None):
    d, f = cfg.d_model, inner_dim or cfg.ffn_inner_dim
    pdt = dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    self.w_gate = normal_param(rngs, linear_std(cfg), (d, f), ("embed", "mlp"), pdt)
    self.w_up = normal_param(rngs, linear_std(cfg), (d, f), ("embed", "mlp"), pdt)
    self.w_down = normal_param(rngs, output_std(cfg), (f, d), ("mlp", "embed"), pdt)

  def __call__(self, h: jax.Array) -> jax.Array:
    dt = self.dtype   # weight_dot: float32 weights stay unrounded on CPU
    gate = jax.nn.silu(weight_dot(h, self.w_gate[...], dt))
    return weight_dot(gate * weight_dot(h, self.w_up[...], dt), self.w_down[...], dt)
