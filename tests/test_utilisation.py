"""Model FLOPs, TFLOP/s and MFU: model/flops.py against a hand count and
against XLA's count of the compiled train step; the peak table. What a
run logs (TFLOP/s, MFU with a peak, n/a without) is checked on the runs of
test_grad_accum.py, which train anyway."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import pytest

from ultramem_jax.model.flops import config_flops
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import make_train_step
from ultramem_jax.training.utilisation import Utilisation, known_peak

REPO = pathlib.Path(__file__).resolve().parents[1]
D, L, H, F, V, T = 64, 2, 2, 192, 256, 64
SHAPE = [f"model.d_model={D}", f"model.n_layers={L}", f"model.n_heads={H}",
         f"model.ffn.inner_dim={F}", f"model.vocab_size={V}", f"data.seq_len={T}",
         "data.batch_size=8", "data.tokenizer=bytes"]


def _cfg(*extra):
  return load_config(REPO / "configs/tiny_dense.yaml", SHAPE + list(extra))


def test_forward_and_train_flops_by_hand():
  f = config_flops(_cfg())
  hd = D // H
  # Per layer: q, k, v, o (4 d x d) and the SwiGLU's 3 d x F, 2 per MAC.
  assert f.matrix == L * 2 * (4 * D * H * hd + 3 * D * F)
  assert f.attention == 4 * L * T * H * hd   # q.k and p.v over T positions
  assert f.head == 2 * V * D
  assert f.train == 3 * (f.matrix + f.attention + f.head)
  # 6 N + 12 L T d (PaLM), N = the matrices and the head.
  n = L * (4 * D * D + 3 * D * F) + V * D
  assert f.train == 6 * n + 12 * L * T * D


def test_moe_flops_by_hand():
  e, k, fe = 8, 2, 48
  f = config_flops(_cfg("model.ffn.kind=moe", f"model.ffn.moe.num_experts={e}",
                        f"model.ffn.moe.top_k={k}", f"model.ffn.moe.expert_dim={fe}"))
  # The router scores all E experts; each token runs k experts.
  assert f.matrix == L * 2 * (4 * D * D + D * e + k * 3 * D * fe)


def test_train_flops_match_the_compiled_train_step():
  """XLA's count of the whole train step (matrix products, and the
  elementwise work, softmax and optimizer the formula leaves out) lies
  between the formula and 8% above it (3.6% measured on 2026-12-01)."""
  cfg = _cfg()
  with use_mesh(single_device_mesh()):
    graphdef, state = create_state(cfg)
    batch = {"inputs": jnp.zeros((8, T), jnp.int32),
             "targets": jnp.zeros((8, T), jnp.int32)}
    cost = make_train_step(graphdef).lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_per_token = cost["flops"] / (8 * T)
  ratio = xla_per_token / config_flops(cfg).train
  assert 1.0 <= ratio <= 1.08, ratio


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v5p", 459),
    ("TPU v6 lite", 918), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("cpu", None)])
def test_peak_table(kind, peak):
  got = known_peak(kind)
  assert (got[0] if got else None) == peak


def test_utilisation_arithmetic():
  u = Utilisation(train_flops_per_token=6_000_000, devices=4, peak_tflops=0.5,
                  peak_source="test")
  assert u.tflops_per_device(1e6) == pytest.approx(1.5)  # 6e12 / 4 / 1e12
  assert u.mfu(1e6) == pytest.approx(3.0)
  assert Utilisation(1, 1, None, "x").mfu(1e6) is None
