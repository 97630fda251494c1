"""inspect: counts against hand-written formulas and the spec's numbers."""

import json
import subprocess
import sys
import time

import pytest

from ultramem_jax.config import load_config
from ultramem_jax.inspect import inspect_config


def dense_formula(v, d, L, h, kv, hd, f, tied, seq):
  attn = d * h * hd + 2 * d * kv * hd + h * hd * d
  ffn = 3 * d * f
  norms = 2 * d
  non_emb = L * (attn + ffn + norms) + d
  emb = v * d * (1 if tied else 2)
  flops = 2 * L * (attn + ffn) + 4 * L * seq * h * hd + 2 * v * d
  return non_emb, emb, flops


@pytest.mark.parametrize("tied,kv", [(True, 0), (False, 2)])
def test_dense_counts_match_formula(tied, kv):
  cfg = load_config("configs/tiny_dense.yaml", [
      f"model.tie_embeddings={str(tied).lower()}", f"model.n_kv_heads={kv}"])
  out = inspect_config(cfg)
  m = cfg.model
  non_emb, emb, flops = dense_formula(
      4096, m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.attn_head_dim,
      m.ffn_inner_dim, tied, cfg.data.seq_len)
  assert out["vocab_size"] == 4096  # from data.bpe_vocab_size
  assert out["non_embedding_params"] == non_emb
  assert out["embedding_params"] == emb
  assert out["total_params"] == non_emb + emb
  assert out["activated_non_embedding_params"] == non_emb
  assert out["activated_params"] == non_emb + 4096 * m.d_model + (0 if tied else m.d_model)
  assert out["flops_per_token"] == flops


def test_paper_227m_trunk_matches_spec_numbers():
  """Spec section 3: attention 20 x 4 x 768^2 = 47.2M, dense FFN
  20 x 3 x 768 x 2496 = 115M, vocabulary 50,304."""
  out = inspect_config(load_config("configs/paper/base_227m.yaml"))
  attention = 20 * 4 * 768 ** 2
  ffn = 20 * 3 * 768 * 2496
  norms = 20 * 2 * 768 + 768
  assert out["non_embedding_params"] == attention + ffn + norms
  assert out["embedding_params"] == 2 * 50304 * 768


def test_cli_answers_for_a_7b_config_in_seconds():
  t = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "ultramem_jax.inspect", "configs/paper/base_1b.yaml",
       "model.d_model=4096", "model.n_layers=32", "model.n_heads=32",
       "model.ffn.inner_dim=11008", "model.vocab_size=32000"],
      capture_output=True, text=True, check=True)
  elapsed = time.perf_counter() - t
  out = json.loads(proc.stdout)
  assert out["total_params"] == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) \
      + 4096 + 2 * 32000 * 4096
  assert 6.5e9 < out["total_params"] < 7.0e9
  print(f"inspect of a {out['total_params'] / 1e9:.2f}B config took {elapsed:.1f}s")


def test_cli_reports_config_errors():
  proc = subprocess.run(
      [sys.executable, "-m", "ultramem_jax.inspect", "configs/tiny_dense.yaml",
       "model.n_heads=3"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert "model.n_heads: got 3" in proc.stderr


@pytest.mark.parametrize("path,active,total,tol", [
    ("configs/paper/moe_227m.yaml", 228e6, 1.18e9, 0.03),
    ("configs/paper/moe_1b7b.yaml", 1.07e9, 6.71e9, 0.10),
])
def test_paper_moe_configs_match_table_10(path, active, total, tol):
  """Spec section 3's convention: total excludes embedding and output
  matrices; active adds one vocab x d matrix at 227M, none at 1B/7B."""
  out = inspect_config(load_config(path))
  assert out["non_embedding_params"] == pytest.approx(total, rel=tol)
  if "227m" in path:
    got_active = out["activated_non_embedding_params"] + 50304 * 768
  else:
    got_active = out["activated_non_embedding_params"]
  assert got_active == pytest.approx(active, rel=tol)


def test_moe_activated_counts_exactly_top_k_experts_and_router():
  dense = inspect_config(load_config("configs/tiny_dense.yaml"))
  moe = inspect_config(load_config("configs/tiny_moe.yaml"))
  d, L, E, k, f = 128, 4, 64, 8, 48
  # tiny_dense's FFN (3 * d * 384 per block) swapped for router + k experts.
  expected = dense["activated_non_embedding_params"] - L * 3 * d * 384 \
      + L * (d * E + k * 3 * d * f)
  assert moe["activated_non_embedding_params"] == expected
  assert moe["non_embedding_params"] == dense["non_embedding_params"] \
      - L * 3 * d * 384 + L * (d * E + E * 3 * d * f)
