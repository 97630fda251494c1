"""Initialisation of the memory layers (spec, Initialisation; section 6)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.config import to_dict
from ultramem_jax.model.ffn import SwiGLU
from ultramem_jax.model.memory.init import calibrate_memory
from ultramem_jax.model.memory.init import top1_scores
from ultramem_jax.model.memory.layer import MemoryLayer
from ultramem_jax.model.memory.layer import initial_value_std
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import from_dict

# The spec's worked example, UltraMemV2-227M's layer: d=768, inner 2496,
# n=360, m=32, Dp=Dv=192, L=20. (The ratio below grows with n, as the top-m
# scores crowd closer to the top-1; at n=64 it falls below 0.4.)
PAPER = {"d_model": 768, "n_layers": 20, "n_heads": 12, "vocab_size": 64,
         "ffn": {"inner_dim": 2496},
         "memory": {"layers": "all", "n_keys": 360, "key_dim": 192, "top_m": 32,
                    "value_dim": 192, "pre_value_dim": 192, "init_samples": 1024}}


def model_cfg(model: dict):
  data = to_dict(from_dict({}))
  for k, v in model.items():
    if isinstance(v, dict):
      data["model"][k].update(v)
    else:
      data["model"][k] = v
  return from_dict(data).model


class OneBlock(nnx.Module):
  """The FFN slot of one block: a SwiGLU and a memory layer side by side."""

  def __init__(self, cfg, seed):
    rngs = nnx.Rngs(seed)
    self.ffn = SwiGLU(cfg, 0, rngs=rngs)
    self.memory = MemoryLayer(cfg, 0, rngs=rngs)


@pytest.fixture(autouse=True)
def mesh():
  with use_mesh(single_device_mesh()):
    yield


def test_eq26_matches_the_spec_example():
  cfg = model_cfg(PAPER)
  # sigma_V**4 = 0.2 * 3.25 * 768 / (32 * 1 * (1 + s2) * 192 * 192 * 20)
  for s2 in (0.0, 0.03, 0.1):
    want = (0.2 * 3.25 * 768 / (32 * (1 + s2) * 192 * 192 * 20)) ** 0.25
    assert initial_value_std(cfg, s2) == pytest.approx(want, rel=1e-12)
  assert initial_value_std(cfg, 0.1) == pytest.approx(0.066, abs=0.001)


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_init_normalises_scores_and_matches_ffn_variance(seed):
  """After calibration the mean top-1 score is 1 on fresh inputs, and the
  memory layer's output variance is 0.3-0.7 of the FFN's (spec: about
  0.4-0.5, since the top-m scores average about 0.7 of the top-1)."""
  cfg = model_cfg(PAPER)
  block = OneBlock(cfg, seed)
  raw_top1 = float(jnp.mean(top1_scores(block.memory, jax.random.key(7), 512)))
  sigma = calibrate_memory(block, cfg, seed)
  (s2,) = sigma.values()
  top1 = top1_scores(block.memory, jax.random.key(99), 2048)
  assert float(jnp.mean(top1)) == pytest.approx(1.0, abs=0.03)
  assert 0.005 < float(s2) < 0.3
  # The tables now have Eq. 26's std for the measured sigma_s2.
  want = initial_value_std(cfg, float(s2))
  for var in (block.memory.table.values, block.memory.table.pre_values):
    assert float(jnp.std(var[...])) == pytest.approx(want, rel=0.02)

  h = jax.random.normal(jax.random.key(5), (4096, cfg.d_model))
  ratio = float(jnp.var(block.memory(h)) / jnp.var(block.ffn(h)))
  print(f"seed {seed}: raw mean top-1 {raw_top1:.3g}, sigma_s2 {float(s2):.3f}, "
        f"Var(Mem)/Var(FFN) {ratio:.3f}")
  assert 0.3 < ratio < 0.7


def test_paper_init_distributions():
  cfg = model_cfg(PAPER)
  layer = OneBlock(cfg, 0).memory
  dk, d = 192, 768
  checks = {"w_q": dk ** -0.5, "keys": dk ** -0.5, "w_p": math.sqrt(2 / (5 * d)),
            "w_o": math.sqrt(2 / (5 * d))}
  for name, std in checks.items():
    assert float(jnp.std(getattr(layer, name)[...])) == pytest.approx(std, rel=0.03), name
  cores = np.asarray(layer.cores[...])
  assert cores.min() >= 0 and cores.max() < 1 and abs(cores.mean() - 0.5) < 0.2
  np.testing.assert_allclose(layer.query_norm[...], dk ** -0.4, rtol=1e-6)
  perm = np.asarray(layer.perm[...])
  assert sorted(perm.tolist()) == list(range(360 * 360))


def test_released_code_init_path():
  cfg = model_cfg({**PAPER, "memory": {**PAPER["memory"], "init": "released"}})
  block = OneBlock(cfg, 0)
  assert calibrate_memory(block, cfg, 0) == {}
  layer = block.memory
  np.testing.assert_allclose(layer.query_norm[...], 192 ** -0.4, rtol=1e-6)
  np.testing.assert_allclose(layer.key_norm[...], 192 ** -0.4, rtol=1e-6)
  checks = {"w_p": 768 ** -0.5, "w_o": 192 ** -0.5}
  for name, std in checks.items():
    assert float(jnp.std(getattr(layer, name)[...])) == pytest.approx(std, rel=0.03), name
  for var in (layer.table.values, layer.table.pre_values):
    assert float(jnp.std(var[...])) == pytest.approx(0.02, rel=0.02)


def test_ultramem_v1_value_init():
  cfg = model_cfg({"d_model": 64, "n_layers": 8, "n_heads": 4, "vocab_size": 64,
                   "memory": {"layers": "1:2/5:6", "heads": 2, "share_query": True,
                              "n_keys": 32, "key_dim": 16, "top_m": 8,
                              "value_dim": 32, "value_expansion": 4,
                              "value_init": "ultramem"}})
  layer = MemoryLayer(cfg, 0, rngs=nnx.Rngs(0))
  want = math.sqrt(4 / (2 * 8 * 2 * 2))  # E / (2 m heads L), L = 2 memory layers
  assert float(jnp.std(layer.table.values[...])) == pytest.approx(want, rel=0.02)
  assert layer.table.pre_values is None
