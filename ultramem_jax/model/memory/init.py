"""The paper's initialisation of the memory layers (spec, Initialisation).

Construction (``layer.py``) draws every parameter from its distribution
with the query/key-norm scales at Dk**-0.4 and the tables at the Eq. 26 std
for sigma_s2 = 0. :func:`calibrate_memory` then, for each layer on the
``paper`` path:

1. measures the mean top-1 score s1 (the g of the best kept pair) over
   ``init_samples`` random unit-variance inputs, with the layer's own
   parameters;
2. multiplies both norm scales by s1**-1/4 (g is bilinear in each scale
   pair; s1**-1/2 for ``score: sum``, which is linear in it), so the mean
   top-1 score becomes 1;
3. takes sigma_s2, the variance of the normalised top-1 score;
4. rescales the values and pre-values to Eq. 26's sigma_V for that sigma_s2
   (a shared table uses the mean sigma_s2 of the layers reading it).

Everything is jnp, so it runs eagerly, under ``jax.jit`` or abstractly
under ``nnx.eval_shape``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.memory.layer import (MemoryLayer, MemoryTable,
                                             initial_value_std, memory_layers)


def top1_scores(layer: MemoryLayer, key: jax.Array, samples: int) -> jax.Array:
  """Top-1 score g of every head for `samples` N(0, 1) inputs, [samples, H]."""
  x = jax.random.normal(key, (samples, layer.d_model), jnp.float32)
  kept, _ = layer.retrieve(x.astype(layer.dtype))
  return jax.lax.stop_gradient(kept.scores[..., 0])


def calibrate_layer(layer: MemoryLayer, key: jax.Array, samples: int) -> jax.Array:
  """Steps 1-3 above for one layer; returns its sigma_s2."""
  top1 = top1_scores(layer, key, samples)
  s1 = jnp.mean(top1)
  # A non-positive mean cannot be normalised by a scale; leave it be.
  s1 = jnp.where(s1 > 0, s1, 1.0)
  alpha = s1 ** layer.recipe.retrieval.score_power
  for scale in (layer.query_norm, layer.key_norm):
    scale.value = (scale[...] * alpha).astype(scale[...].dtype)
  return jnp.var(top1 / s1)


def _rescale_table(table: MemoryTable, factor: jax.Array) -> None:
  for var in (table.values, table.pre_values):
    if var is not None:
      var.value = (var[...] * factor).astype(var[...].dtype)


def calibrate_memory(model: nnx.Module, cfg: ModelConfig, seed: int) -> dict[str, jax.Array]:
  """Calibrates every memory layer of `model` (paper path only); returns
  ``{path: sigma_s2}``."""
  mem = cfg.memory
  layers = memory_layers(model)
  if not layers or mem.init != "paper":
    return {}
  key = jax.random.key(seed)
  sigma = {}
  for i, (path, layer) in enumerate(layers):
    sigma[path] = calibrate_layer(layer, jax.random.fold_in(key, i),
                                  mem.init_samples)
  if mem.value_init != "eq26":
    return sigma
  base = initial_value_std(cfg, 0.0)
  for path, layer in layers:
    if layer.table is not None:
      _rescale_table(layer.table, initial_value_std(cfg, sigma[path]) / base)
  shared = getattr(model, "memory_table", None)
  if shared is not None:
    mean = jnp.mean(jnp.stack(list(sigma.values())))
    _rescale_table(shared, initial_value_std(cfg, mean) / base)
  return sigma
