"""The presets of configs/released/ (the released code's runs): they
validate as train.py checks them before reading data, they hold the released
flags' values, and inspect's counts match the widths, computed here term by
term (embedding, attention, FFN, memory tables, keys, cores, projections)."""

from __future__ import annotations

import dataclasses

import pytest

from ultramem_jax.inspect import inspect_config
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.model.memory.config import MemoryConfig
from ultramem_jax.parallel.mesh import check_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.memory_budget import check_vocab

P227 = "configs/released/ultramem_v2_227m.yaml"
P1B7B = "configs/released/ultramem_v2_1b7b.yaml"
HAS_KEY_EXPANSION = "key_expansion" in {f.name for f in dataclasses.fields(MemoryConfig)}


def hand_counts(*, v, d, L, f, tied, n, ratio, x, dk, dv, dp, m, r=2, hc=2):
  """(non-embedding, activated non-embedding, embedding) parameters of an
  UltraMemV2 model with a memory layer in every block (one head, one shared
  table of n^2 * L rows, each layer reading a window of ratio of it, with
  key expansion x), from the widths."""
  attention = 4 * d * d                      # Wq, Wk, Wv, Wo (no GQA here)
  ffn = 3 * d * f                            # SwiGLU
  norms = 2 * d                              # two RMSNorm scales per block
  trunk = L * (attention + ffn + norms) + d  # + the final norm
  rows = n * n * L
  ns = int((ratio * rows) ** 0.5)            # keys per side of one layer
  tables = rows * (dv + dp)                  # values and pre-values
  queries = d * 2 * r * dk                   # all 2r queries are projected
  key_norms = 2 * dk                         # query and key norm scales
  keys = 2 * (x * ns) * dk * r               # both sides, expanded
  cores = hc * r * r
  projections = d * dp + dv * d              # Wp and Wo
  own = queries + key_norms + keys + cores + projections
  read = m * (dv + dp)                       # the m rows a token reads
  embedding = v * d * (1 if tied else 2)
  return trunk + L * own + tables, trunk + L * (own + read), embedding


def test_released_227m_validates_as_train_does():
  """What train.py checks before it reads data (training/prepare.py's
  _check_planned), less the memory bound, which depends on the machine."""
  cfg = load_config(P227)
  check_vocab(cfg)
  model = abstract_model(cfg)
  assert check_mesh(cfg, model, 1, batch=False)["data"] == 1
  m, mem, groups = cfg.model, cfg.model.memory, cfg.optimizer.param_groups
  assert (m.d_model, m.n_layers, m.n_heads, m.kv_heads) == (768, 20, 12, 12)
  assert m.tie_embeddings and m.ffn_inner_dim == 4992 // 2
  assert m.norm_eps == 1e-5
  assert (mem.n_keys, mem.key_dim, mem.value_dim, mem.pre_value_dim,
          mem.top_m, mem.heads) == (360, 192, 192, 192, 32, 1)
  assert mem.share_values and mem.share_ratio == 0.5
  assert not mem.per_rank_queries and mem.init == "released"
  assert mem.value_activation == "none" and mem.value_expansion == 1
  assert groups["values"].lr_multiplier == 4.0
  assert groups["values"].multiplier_decay_steps == cfg.train.steps
  assert groups["no_decay"].weight_decay
  assert cfg.data.batch_size * cfg.data.seq_len * cfg.train.steps >= 5e11


def test_released_227m_counts_match_hand_computed():
  cfg = load_config(P227)
  out = inspect_config(cfg, devices=1)
  non_emb, act, emb = hand_counts(v=50304, d=768, L=20, f=2496, tied=True,
                                  n=360, ratio=0.5, x=1, dk=192, dv=192,
                                  dp=192, m=32)
  assert out["memory"]["keys_per_side"] == 1138  # floor(sqrt(0.5 * 20 * 360^2))
  assert out["memory"]["table_params"] == 20 * 360 ** 2 * (192 + 192)
  assert out["non_embedding_params"] == non_emb == 1_192_743_328
  assert out["activated_non_embedding_params"] == act == 197_661_088
  assert out["embedding_params"] == emb
  assert out["activated_params"] == act + 50304 * 768


@pytest.mark.skipif(not HAS_KEY_EXPANSION,
                    reason="needs model.memory.key_expansion (issue 16, part 1)")
def test_released_run_script_counts_match_hand_computed():
  """run_ultramem_v2.sh: 16 layers reading 1/16 of 16 x 128^2 rows each
  (128 keys per side), expanded twice (256 keys per side); the table split
  over 4 devices by columns."""
  cfg = load_config(P1B7B)
  assert cfg.model.memory.key_expansion == 2 and cfg.mesh.memory == 4
  out = inspect_config(cfg, devices=4)
  non_emb, act, emb = hand_counts(v=50304, d=2048, L=16, f=5632, tied=False,
                                  n=128, ratio=0.0625, x=2, dk=512, dv=768,
                                  dp=256, m=32)
  assert out["non_embedding_params"] == non_emb == 1_199_655_040
  assert out["activated_non_embedding_params"] == act == 931_743_872
  assert out["embedding_params"] == emb
