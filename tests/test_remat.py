"""model.remat: every policy gives the loss and gradients of no remat for
the dense, MoE and UltraMemV2 tiny models, save_dots_and_retrieval keeps
the memory layer's top-k out of the backward pass (counted in the
gradient's jaxpr), and a run may resume with another policy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.model.config import FFNConfig, ModelConfig, MoEConfig
from ultramem_jax.model.memory.config import MemoryConfig
from ultramem_jax.model.transformer import build_model
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.run_dir import model_data_difference
from ultramem_jax.training.step import loss_fn

BASE = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=2)
MODELS = {
    "dense": BASE,
    "moe": dataclasses.replace(BASE, ffn=FFNConfig(
        kind="moe", moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16))),
    "ultramem_v2": dataclasses.replace(
        BASE, ffn=FFNConfig(inner_dim=48),
        memory=MemoryConfig(layers="all", n_keys=8, key_dim=8, top_m=4,
                            value_dim=16, pre_value_dim=8, init="released",
                            kernels="xla")),
}
POLICIES = ("full", "save_dots", "save_dots_and_retrieval")
TOKENS = jax.random.randint(jax.random.key(0), (2, 9), 0, 61)
BATCH = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, 1, axis=1)}


@pytest.fixture(scope="module")
def mesh():
  with use_mesh(single_device_mesh()) as m:
    yield m


def losses_and_grads(cfg: ModelConfig, policies: tuple[str, ...]) -> dict:
  """{policy: (objective, metrics, gradients)} of one batch for one set of
  parameters, all policies in one jitted function (one compile)."""
  graphdef, state = nnx.split(build_model(cfg, seed=0))

  @jax.jit
  def run(state):
    out = {}
    for policy in policies:
      model = nnx.merge(graphdef, state)
      model.remat = policy
      (total, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, BATCH)
      out[policy] = (total, metrics, grads)
    return out

  return run(state)


def grad_count(cfg: ModelConfig, primitive: str) -> int:
  """How often `primitive` occurs in the jaxpr of the loss's gradient,
  nested jaxprs (remat, scan) included."""
  graphdef, state = nnx.split(build_model(cfg, seed=0))

  def grads(state):
    return nnx.grad(lambda m: loss_fn(m, BATCH)[0])(nnx.merge(graphdef, state))

  def count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == primitive
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            n += count(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            n += count(sub)
    return n

  return count(jax.make_jaxpr(grads)(state).jaxpr)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_policy_gives_the_loss_and_gradients_of_none(mesh, name):
  out = losses_and_grads(MODELS[name], ("none",) + POLICIES)
  total, metrics, grads = out["none"]
  assert float(total) > 0 and len(nnx.to_flat_state(grads)) > 5
  for policy in POLICIES:
    t, m, g = out[policy]
    np.testing.assert_allclose(float(t), float(total), rtol=1e-6, atol=1e-6)
    assert set(m) == set(metrics)
    flat, ref = nnx.to_flat_state(g), dict(nnx.to_flat_state(grads))
    assert len(flat) == len(ref)
    for path, var in flat:
      np.testing.assert_allclose(np.asarray(var.get_value()),
                                 np.asarray(ref[path].get_value()),
                                 rtol=1e-6, atol=1e-6, err_msg=f"{policy} {path}")


@pytest.mark.parametrize("scan", [False, True])
def test_save_dots_and_retrieval_does_not_redo_the_top_k(mesh, scan):
  cfg = dataclasses.replace(MODELS["ultramem_v2"], scan_layers=scan,
                            n_layers=2 if scan else 1)
  counts = {p: grad_count(dataclasses.replace(cfg, remat=p), "top_k")
            for p in ("none", "full", "save_dots_and_retrieval")}
  # Per memory layer: the K keys of each side, then the grid's top m.
  forward = 3 * (1 if scan else cfg.n_layers)   # a scan traces its body once
  assert counts["none"] == forward
  assert counts["full"] == 2 * forward          # the backward pass redoes them
  assert counts["save_dots_and_retrieval"] == forward


def test_a_run_may_resume_with_another_policy():
  saved = {"model": {"remat": "none", "d_model": 32}}
  assert model_data_difference(saved, {"model": {"remat": "full", "d_model": 32}}) is None
  assert model_data_difference(saved, {"model": {"remat": "full", "d_model": 64}}) == (
      "model.d_model", 32, 64)
