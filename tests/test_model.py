"""The Transformer: causality, attention against a numpy reference, rotary
positions, initialisation, logical axis names, dtypes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.model.attention import Attention, rotary
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.transformer import build_model
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.parallel.rules import RULES
from ultramem_jax.training.config import load_config

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4,
                   n_kv_heads=2)


@pytest.fixture(scope="module")
def mesh():
  with use_mesh(single_device_mesh()) as m:
    yield m


# Every model the claims compare, at its tiny config shrunk to d = 32: no
# logit before t moves when token t changes, the logit at t does (Memory+'s
# table shared across blocks, UltraMem v1's skip layers, PKM and PEER
# included: a memory layer reads per token).
@pytest.mark.parametrize("name", ["dense", "moe", "ultramem_v2", "ultramem",
                                  "memory_plus", "pkm", "peer"])
def test_every_model_is_causal(mesh, name):
  small = ["model.vocab_size=61", "model.d_model=32", "model.n_heads=2",
           "model.n_kv_heads=2", "model.memory.init_samples=32"]
  memory = ["model.memory.n_keys=8", "model.memory.key_dim=8",
            "model.memory.top_m=4", "model.memory.value_dim=32",
            "model.memory.pre_value_dim=32"]
  cfg = load_config(f"configs/tiny_{name}.yaml",
                    small + (memory if name not in ("dense", "moe") else []))
  graphdef, params = nnx.split(build_model(cfg.model, seed=0))
  tokens = jax.random.randint(jax.random.key(2), (10,), 0, 61)
  # One batch: the sequence, and the sequence with token 3, then token 9, changed.
  changed = [tokens.at[t].set((tokens[t] + 1) % 61) for t in (3, 9)]
  logits = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(
      params, jnp.stack([tokens, *changed])))
  for row, t in ((1, 3), (2, 9)):
    np.testing.assert_array_equal(logits[row, :t], logits[0, :t])
    assert np.abs(logits[row, t] - logits[0, t]).max() > 1e-4


def _numpy_attention(x, wq, wk, wv, wo, theta):
  """Per-head loop; rotary as multiplication of complex pairs
  (x_i + i x_{i+H/2}) by exp(i * pos * theta^(-2i/H))."""
  b, t, _ = x.shape
  h, hd = wq.shape[1], wq.shape[2]
  kv = wk.shape[1]
  half = hd // 2
  freq = theta ** (-np.arange(half) / half)
  rot = np.exp(1j * np.arange(t)[:, None] * freq[None, :])  # [T, half]

  def apply_rot(v):  # v [T, hd]
    z = (v[:, :half] + 1j * v[:, half:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)

  out = np.zeros((b, t, h, hd))
  for bi in range(b):
    for head in range(h):
      g = head // (h // kv)
      q = apply_rot(x[bi] @ wq[:, head])
      k = apply_rot(x[bi] @ wk[:, g])
      v = x[bi] @ wv[:, g]
      s = q @ k.T / math.sqrt(hd)
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, head] = p @ v
  return np.einsum("btnh,nhd->btd", out, wo)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_numpy_reference(mesh, kv_heads):
  cfg = dataclasses.replace(TINY, n_kv_heads=kv_heads)
  attn = Attention(cfg, rngs=nnx.Rngs(params=3))
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model)))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  got = np.asarray(attn(jnp.asarray(x), pos))
  ref = _numpy_attention(x.astype(np.float64), *(np.asarray(w[...], np.float64)
                         for w in (attn.wq, attn.wk, attn.wv, attn.wo)),
                         cfg.rope_theta)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)


def test_rotary_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(pq, pk):
    rq = rotary(q, jnp.full((1, 1), pq), 10000.0)
    rk = rotary(k, jnp.full((1, 1), pk), 10000.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-4)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)
  assert abs(score(7, 3) - score(7, 4)) > 1e-3


def test_initialisation_stds(mesh):
  cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4,
                    tie_embeddings=False)
  model = build_model(cfg, seed=0)
  std = math.sqrt(2 / (5 * cfg.d_model))
  out_std = std / math.sqrt(2 * cfg.n_layers)
  block = model.blocks[0]
  expected = {
      "token_embed": (model.token_embed, std), "lm_head": (model.lm_head, std),
      "wq": (block.attn.wq, std), "wk": (block.attn.wk, std),
      "w_gate": (block.ffn.w_gate, std), "w_up": (block.ffn.w_up, std),
      "wo": (block.attn.wo, out_std), "w_down": (block.ffn.w_down, out_std),
  }
  for name, (p, want) in expected.items():
    got = float(jnp.std(p[...]))
    assert got == pytest.approx(want, rel=0.05), name
  np.testing.assert_array_equal(np.asarray(block.attn_norm.scale[...]), 1.0)


def test_every_parameter_has_logical_axis_names(mesh):
  model = build_model(dataclasses.replace(TINY, tie_embeddings=False), seed=0)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) > 10
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path
    assert all(n in RULES for n in names), (path, names)


def test_tied_and_untied_heads(mesh):
  tied = build_model(TINY, seed=0)
  untied = build_model(dataclasses.replace(TINY, tie_embeddings=False), seed=0)
  assert not hasattr(tied, "lm_head") and hasattr(untied, "lm_head")
  tokens = jnp.arange(10)[None] % TINY.vocab_size
  # Tied logits are exactly the final hidden state against the embedding.
  x = jnp.take(tied.token_embed[...], tokens, axis=0)
  for block in tied.blocks:
    x, _ = block(x, jnp.arange(10)[None])
  manual = tied.final_norm(x) @ tied.token_embed[...].T
  np.testing.assert_allclose(tied(tokens), manual, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(mesh):
  cfg32 = TINY
  cfg16 = dataclasses.replace(TINY, dtype="bfloat16")
  m32, m16 = build_model(cfg32, seed=0), build_model(cfg16, seed=0)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, TINY.vocab_size)
  out32, out16 = m32(tokens), m16(tokens)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.05)
  assert float(jnp.abs(out16 - out32).max()) > 0  # really ran in bf16
