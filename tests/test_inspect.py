"""inspect: counts against hand-written formulas and the spec's numbers."""

import json
import subprocess
import sys
import time

import pytest

from ultramem_jax.inspect import inspect_config
from ultramem_jax.inspect import main as inspect_main
from ultramem_jax.training.config import load_config


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


def test_cli_reports_config_errors(capsys):
  assert inspect_main(["configs/tiny_dense.yaml", "model.n_heads=3"]) == 2
  assert "model.n_heads: got 3" in capsys.readouterr().err


@pytest.mark.parametrize("path,active,total,tol", [
    ("configs/paper/moe_227m.yaml", 228e6, 1.18e9, 0.03),
    ("configs/paper/moe_1b7b.yaml", 1.07e9, 6.71e9, 0.10),
    ("configs/paper/ultramem_v2_227m.yaml", 225e6, 1.18e9, 0.03),
    ("configs/paper/ultramem_227m.yaml", 225e6, 1.18e9, 0.03),
    ("configs/paper/memory_plus_227m.yaml", 228e6, 1.19e9, 0.03),
    ("configs/paper/ultramem_v2_1b7b.yaml", 1.08e9, 6.70e9, 0.10),
])
def test_paper_configs_match_table_10(path, active, total, tol):
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


def memory_formula(d, dk, r, hc, heads, q_heads, ns, dp, dv, e, m, proj_p=True,
                   proj_o=True, gate=False):
  """(params outside the table, activated params) of one memory layer, from
  the widths (spec section 2's parameter list)."""
  own = d * q_heads * 2 * r * dk + 2 * dk + heads * 2 * ns * dk * r
  own += hc * heads * r * r if hc else 0
  own += d * dp if dp and proj_p else 0
  own += e * dv * d if proj_o else 0
  own += d * e * dv if gate else 0
  return own, own + heads * m * (dv + dp)


def test_memory_counts_match_formula():
  v2 = inspect_config(load_config("configs/tiny_ultramem_v2.yaml"))
  dense = inspect_config(load_config("configs/tiny_dense.yaml"))
  own, act = memory_formula(128, 64, 2, 2, 1, 1, 90, 64, 64, 1, 16)
  ffn_delta = 4 * 3 * 128 * (212 - 384)
  assert v2["activated_non_embedding_params"] == \
      dense["activated_non_embedding_params"] + ffn_delta + 4 * act
  assert v2["non_embedding_params"] == dense["non_embedding_params"] + ffn_delta \
      + 4 * (own + 90 * 90 * (64 + 64))
  assert v2["memory"]["table_params"] == 4 * 8100 * 128

  v1 = inspect_config(load_config("configs/tiny_ultramem.yaml"))
  # Two skip layers, 2 heads sharing a query, E = 4: 2 * 180 keys per side.
  own, act = memory_formula(128, 32, 2, 2, 2, 1, 360, 0, 64, 4, 16)
  ffn_delta = 4 * 3 * 128 * (218 - 384)
  assert v1["activated_non_embedding_params"] == \
      dense["activated_non_embedding_params"] + ffn_delta + 2 * act
  assert v1["non_embedding_params"] == dense["non_embedding_params"] + ffn_delta \
      + 2 * (own + 180 * 180 * 64)

  mp = inspect_config(load_config("configs/tiny_memory_plus.yaml"))
  # One shared table of 2 * 126^2 rows; 178 keys per side; FFN replaced.
  own, act = memory_formula(128, 32, 1, 0, 2, 2, 178, 0, 128, 1, 16, gate=True)
  assert mp["memory"]["keys_per_side"] == 178 and mp["memory"]["tables"] == 1
  assert mp["non_embedding_params"] == dense["non_embedding_params"] \
      + 2 * 3 * 128 * 612 - 4 * 3 * 128 * 384 + 2 * own + 2 * 126 ** 2 * 128


@pytest.mark.parametrize("path,total_tol", [
    ("configs/tiny_ultramem_v2.yaml", 0.005), ("configs/tiny_ultramem.yaml", 0.005),
    ("configs/tiny_memory_plus.yaml", 0.02), ("configs/tiny_pkm.yaml", 0.02),
    ("configs/tiny_peer.yaml", 0.03),
    ("configs/tiny_ultramem_v2_keyexp.yaml", 0.005)])
def test_small_memory_configs_are_matched_to_tiny_moe(path, total_tol):
  """configs/README.md: the sparse CPU configs match tiny_moe in activated
  (0.1%) and total non-embedding parameters; tiny_dense matches the
  activated count but for the MoE's router (4 x 128 x 64)."""
  moe = inspect_config(load_config("configs/tiny_moe.yaml"))
  out = inspect_config(load_config(path))
  assert out["activated_non_embedding_params"] == pytest.approx(
      moe["activated_non_embedding_params"], rel=0.001)
  assert out["non_embedding_params"] == pytest.approx(
      moe["non_embedding_params"], rel=total_tol)
  dense = inspect_config(load_config("configs/tiny_dense.yaml"))
  assert dense["activated_non_embedding_params"] + 4 * 128 * 64 == \
      moe["activated_non_embedding_params"]
