"""The MoE FFN: dropless and capacity dispatch against per-token loops
(values and gradients), drop counting, auxiliary losses, metrics, counts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.model.common import AuxLoss, LayerMetric, weight_dot
from ultramem_jax.model.config import FFNConfig, ModelConfig, MoEConfig
from ultramem_jax.model.ffn import build_ffn
from ultramem_jax.model.moe import MoE, load_balance_loss
from ultramem_jax.model.transformer import Transformer, build_model
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh

D, E, K, F = 16, 8, 2, 8
B, T = 2, 12  # N = 24 tokens


def make_cfg(**moe) -> ModelConfig:
  return ModelConfig(vocab_size=53, d_model=D, n_layers=2, n_heads=2,
                     ffn=FFNConfig(kind="moe", moe=MoEConfig(
                         num_experts=E, top_k=K, expert_dim=F, **moe)))


@pytest.fixture(scope="module")
def mesh():
  with use_mesh(single_device_mesh()) as m:
    yield m


def _input(seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (B, T, D), dtype)


def _run(layer, h):
  """(y, aux, metrics) with the sown values unwrapped to arrays."""
  y, aux, met = nnx.capture(layer, AuxLoss, LayerMetric)(h)
  unwrap = lambda s: {k: v.get_value()[0] for k, v in s.items()}
  return y, unwrap(aux), unwrap(met)


def _params(layer):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))


def _silu(v):
  return v / (1.0 + np.exp(-v))


def _choices(x, router, renormalize):
  """Per token (numpy, float64): probs, the top-k experts and their weights."""
  out = []
  for xn in x:
    z = xn @ router
    p = np.exp(z - z.max())
    p /= p.sum()
    idx = np.argsort(-p, kind="stable")[:K]
    w = p[idx] / (p[idx].sum() if renormalize else 1.0)
    out.append((p, idx, w))
  return out


def numpy_reference(params, h, renormalize, keep=None):
  """Per-token loop: y_n = sum_j w_j SwiGLU_{e_j}(x_n) (+ shared), skipping
  assignments with keep[n, j] False."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(h, np.float64).reshape(-1, D)
  y = np.zeros_like(x)
  for n, (_, idx, w) in enumerate(_choices(x, p["router"], renormalize)):
    for j, (e, we) in enumerate(zip(idx, w)):
      if keep is not None and not keep[n, j]:
        continue
      act = _silu(x[n] @ p["w_gate"][e]) * (x[n] @ p["w_up"][e])
      y[n] += we * (act @ p["w_down"][e])
    if "shared" in p:
      s = p["shared"]
      y[n] += (_silu(x[n] @ s["w_gate"]) * (x[n] @ s["w_up"])) @ s["w_down"]
  return y.reshape(h.shape)


@jax.jit
def _jnp_token(params, xn, idx, renormalize):
  """One token: sum_j w_j SwiGLU_{idx_j}(xn) (+ shared), in jnp."""
  prob = jax.nn.softmax(xn @ params["router"])
  w = prob[idx]
  w = jnp.where(renormalize, w / jnp.sum(w), w)
  yn = jnp.zeros((D,))
  for j in range(K):
    e = idx[j]
    act = jax.nn.silu(xn @ params["w_gate"][e]) * (xn @ params["w_up"][e])
    yn = yn + w[j] * (act @ params["w_down"][e])
  if "shared" in params:
    s = params["shared"]
    yn = yn + (jax.nn.silu(xn @ s["w_gate"]) * (xn @ s["w_up"])) @ s["w_down"]
  return yn


def jnp_reference(params, h, renormalize, choices):
  """The same per-token loop in jnp (differentiable); the expert indices are
  fixed by `choices`, the weights are recomputed from the router."""
  x = h.reshape(-1, D)
  return jnp.stack([
      _jnp_token(params, x[jnp.int32(n)], jnp.asarray(idx), renormalize)
      for n, (_, idx, _) in enumerate(choices)]).reshape(h.shape)


def model_grads(layer, h, cot):
  """Gradients of sum(y * cot) w.r.t. the pure parameter dict and h."""
  graphdef, state = nnx.split(layer, nnx.Param)

  def f(state, h):
    y, _, _ = _run(nnx.merge(graphdef, state), h)
    return jnp.sum(y.astype(jnp.float32) * cot)

  gs, gh = jax.jit(jax.grad(f, argnums=(0, 1)))(state, h)
  return nnx.to_pure_dict(gs), gh


def _close(a, b, rtol=2e-4, atol=2e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("impl,block", [("ragged_dot", 64), ("blocked", 4),
                                        ("blocked", 5), ("gather", 64),
                                        ("loop", 3)])
def test_dropless_matches_per_token_loop(mesh, renormalize, shared, impl, block):
  layer = MoE(make_cfg(renormalize=renormalize, num_shared_experts=shared,
                       grouped_matmul=impl, block_size=block), 0,
              rngs=nnx.Rngs(params=1))
  params, h = _params(layer), _input()
  y, _, met = _run(layer, h)
  ref = numpy_reference(params, h, renormalize)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-6)
  assert float(met["dropped_fraction"]) == 0.0

  cot = jax.random.normal(jax.random.key(7), h.shape)
  gp, gh = model_grads(layer, h, cot)
  choices = _choices(np.asarray(h, np.float64).reshape(-1, D),
                     params["router"].astype(np.float64), renormalize)
  ref_gp, ref_gh = jax.grad(
      lambda p, h: jnp.sum(jnp_reference(p, h, renormalize, choices) * cot),
      argnums=(0, 1))(jax.tree.map(jnp.asarray, params), h)
  assert set(gp) == set(ref_gp) == ({"router", "w_gate", "w_up", "w_down"}
                                    | ({"shared"} if shared else set()))
  _close(gp, ref_gp)
  _close(gh, ref_gh)
  assert np.abs(np.asarray(gp["router"])).max() > 0


def test_large_capacity_equals_dropless(mesh):
  h, cot = _input(3), jax.random.normal(jax.random.key(8), (B, T, D))
  dropless = MoE(make_cfg(num_shared_experts=1), 0, rngs=nnx.Rngs(params=2))
  capped = MoE(make_cfg(num_shared_experts=1, capacity_factor=float(E)), 0,
               rngs=nnx.Rngs(params=2))
  _close(_params(dropless), _params(capped), rtol=0, atol=0)
  y0, aux0, _ = _run(dropless, h)
  y1, aux1, met1 = _run(capped, h)
  _close(y1, y0, rtol=1e-5, atol=1e-6)
  _close(aux1, aux0, rtol=1e-6, atol=0)
  assert float(met1["dropped_fraction"]) == 0.0
  _close(model_grads(capped, h, cot), model_grads(dropless, h, cot),
         rtol=1e-5, atol=1e-6)


def test_small_capacity_drops_like_brute_force(mesh):
  cf = 0.6  # C = ceil(3.6) = 4: a non-integer, so the rounding is checked
  layer = MoE(make_cfg(capacity_factor=cf), 0, rngs=nnx.Rngs(params=4))
  params, h = _params(layer), _input(5)
  n = B * T
  cap = math.ceil(cf * n * K / E)
  choices = _choices(np.asarray(h, np.float64).reshape(-1, D),
                     params["router"].astype(np.float64), False)
  seen = np.zeros(E, int)
  keep = np.zeros((n, K), bool)
  for t, (_, idx, _) in enumerate(choices):  # token order, then choice order
    for j, e in enumerate(idx):
      keep[t, j] = seen[e] < cap
      seen[e] += 1
  assert (~keep).sum() > 0  # the test is meaningful only if something drops
  y, _, met = _run(layer, h)
  np.testing.assert_allclose(float(met["dropped_fraction"]),
                             (~keep).sum() / (n * K), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y),
                             numpy_reference(params, h, False, keep),
                             rtol=1e-4, atol=1e-6)


def _layer_with_router(router, **moe):
  layer = MoE(make_cfg(**moe), 0, rngs=nnx.Rngs(params=0))
  layer.router[...] = jnp.asarray(router, jnp.float32)
  return layer


def test_load_balance_uniform_equals_coef(mesh):
  coef = 0.01
  # Uniform probs (zero router): the loss is coef whatever top_k's tie-break.
  layer = _layer_with_router(np.zeros((D, E)))
  _, aux, met = _run(layer, _input())
  np.testing.assert_allclose(float(aux["load_balance"]), coef, rtol=1e-6)
  np.testing.assert_allclose(float(met["router_entropy"]), math.log(E),
                             rtol=1e-6)
  # Balanced assignments with non-uniform probs: token t is a one-hot on
  # feature t % 4, which routes it to experts (2 (t%4), 2 (t%4) + 1), so
  # every expert receives exactly N*k/E assignments.
  router = np.zeros((D, E))
  for g in range(4):
    router[g, 2 * g], router[g, 2 * g + 1] = 3.0, 2.0
  x = np.zeros((B * T, D), np.float32)
  x[np.arange(B * T), np.arange(B * T) % 4] = 1.0
  _, aux, met = _run(_layer_with_router(router), jnp.asarray(x).reshape(B, T, D))
  np.testing.assert_allclose(np.asarray(met["expert_load"]), np.full(E, 1 / E))
  np.testing.assert_allclose(float(aux["load_balance"]), coef, rtol=1e-6)
  # The formula itself on uniform f and p.
  u = jnp.full((E,), 1.0 / E)
  np.testing.assert_allclose(float(load_balance_loss(u, u, coef)), coef,
                             rtol=1e-6)


def test_collapsed_router_has_large_load_balance_loss(mesh):
  router = np.zeros((D, E))
  router[:, 0], router[:, 1] = 5.0, 4.0
  h = jnp.abs(_input()) + 0.1  # positive: every token prefers experts 0, 1
  _, aux, met = _run(_layer_with_router(router), h)
  np.testing.assert_allclose(np.asarray(met["expert_load"])[:2], [0.5, 0.5])
  assert float(aux["load_balance"]) > 3.0 * 0.01


def test_z_loss_metrics_and_aux_gradients(mesh):
  layer = MoE(make_cfg(z_loss_coef=0.003, load_balance_coef=0.02), 0,
              rngs=nnx.Rngs(params=6))
  params, h = _params(layer), _input(9)
  _, aux, met = _run(layer, h)
  x = np.asarray(h, np.float64).reshape(-1, D)
  z = x @ params["router"].astype(np.float64)
  lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
  np.testing.assert_allclose(float(aux["router_z"]), 0.003 * np.mean(lse ** 2),
                             rtol=1e-5)
  choices = _choices(x, params["router"].astype(np.float64), False)
  counts = np.bincount(np.concatenate([c[1] for c in choices]), minlength=E)
  load = np.asarray(met["expert_load"])
  np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(load, counts / counts.sum(), rtol=1e-6)
  probs = np.stack([c[0] for c in choices])
  entropy = -(probs * np.log(probs)).sum(-1).mean()
  np.testing.assert_allclose(float(met["router_entropy"]), entropy, rtol=1e-5)
  np.testing.assert_allclose(
      float(aux["load_balance"]),
      0.02 * E * np.sum(counts / counts.sum() * probs.mean(0)), rtol=1e-5)

  # Gradient of the aux losses w.r.t. the router: through p and logsumexp,
  # with f_e held constant.
  graphdef, state = nnx.split(layer, nnx.Param)

  def aux_total(state):
    _, a, _ = _run(nnx.merge(graphdef, state), h)
    return a["load_balance"] + a["router_z"]

  got = nnx.to_pure_dict(jax.grad(aux_total)(state))
  frac = jnp.asarray(counts / counts.sum(), jnp.float32)

  def hand(r):
    zz = h.reshape(-1, D) @ r
    p = jax.nn.softmax(zz, -1).mean(0)
    return (0.02 * E * jnp.sum(frac * p)
            + 0.003 * jnp.mean(jax.nn.logsumexp(zz, -1) ** 2))

  _close(got["router"], jax.grad(hand)(jnp.asarray(params["router"])),
         rtol=1e-4, atol=1e-7)
  for name in ("w_gate", "w_up", "w_down"):
    assert not np.any(np.asarray(got[name]))


@pytest.mark.parametrize("shared", [0, 2])
def test_activated_param_count(mesh, shared):
  layer = MoE(make_cfg(num_shared_experts=shared), 0, rngs=nnx.Rngs(params=0))
  hand = D * E + K * 3 * D * F + shared * 3 * D * F
  assert layer.activated_param_count() == hand
  assert layer.flops_per_token() == 2 * hand
  # The same from the real parameter sizes: router + k/E of the experts.
  p = _params(layer)
  experts = sum(p[n].size for n in ("w_gate", "w_up", "w_down"))
  shared_n = sum(a.size for a in jax.tree.leaves(p.get("shared", {})))
  assert layer.activated_param_count() == (
      p["router"].size + experts * K // E + shared_n)
  assert p["w_gate"].shape == (E, D, F) and p["w_down"].shape == (E, F, D)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_bf16_compute_and_finite_gradients(mesh, capacity_factor):
  cfg = dataclasses.replace(make_cfg(capacity_factor=capacity_factor,
                                     num_shared_experts=1), dtype="bfloat16")
  layer = MoE(cfg, 0, rngs=nnx.Rngs(params=0))
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(_params(layer)))
  h = _input(dtype=jnp.bfloat16)
  y, aux, _ = _run(layer, h)
  assert y.dtype == jnp.bfloat16 and y.shape == h.shape
  assert all(v.dtype == jnp.float32 for v in aux.values())
  gp, gh = model_grads(layer, h, jnp.ones(h.shape, jnp.float32))
  for g in jax.tree.leaves((gp, gh)):
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  assert gh.dtype == jnp.bfloat16


def test_registered_and_sown_per_block(mesh):
  cfg = make_cfg()
  assert isinstance(build_ffn(cfg, 0, rngs=nnx.Rngs(params=0)), MoE)
  model = build_model(cfg, seed=0)
  tokens = jnp.zeros((1, 5), jnp.int32)
  logits, aux = nnx.jit(nnx.capture(Transformer.__call__, AuxLoss))(model, tokens)
  assert logits.shape == (1, 5, cfg.vocab_size)
  flat = {path: v.get_value() for path, v in nnx.to_flat_state(aux)}
  assert set(flat) == {("blocks", i, "ffn", n) for i in range(2)
                       for n in ("load_balance", "router_z")}
  assert all(isinstance(v, tuple) and len(v) == 1 for v in flat.values())
  # The legacy path: sow stores on the module, nnx.pop takes it back out.
  nnx.jit(Transformer.__call__)(model, tokens)
  popped = nnx.pop(model, AuxLoss)
  assert {p for p, _ in nnx.to_flat_state(popped)} == set(flat)
  assert not nnx.to_flat_state(nnx.state(model, AuxLoss))


def test_cpu_bf16_weight_dot_keeps_float32_weights():
  """On CPU, bfloat16 compute over float32 weights multiplies the weights
  unrounded (model/common.py, weight_dot): the float64 product of the
  bfloat16 input and the float32 weight, rounded once to bfloat16."""
  assert jax.default_backend() == "cpu"
  x = jax.random.normal(jax.random.key(0), (3, 64), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (64, 24), jnp.float32)
  got = weight_dot(x, w, jnp.bfloat16)
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2.0 ** -8,
                             atol=1e-6)
  np.testing.assert_array_equal(weight_dot(x.astype(jnp.float32), w, jnp.float32),
                                x.astype(jnp.float32) @ w)


def test_bf16_loop_path_matches_per_token_loop(mesh):
  """The decode path in bfloat16 (float32 weights unrounded on CPU) equals
  the float64 per-token loop on the bfloat16 input to bfloat16 accuracy."""
  cfg = dataclasses.replace(make_cfg(grouped_matmul="loop"), dtype="bfloat16")
  layer = MoE(cfg, 0, rngs=nnx.Rngs(params=1))
  h = _input(dtype=jnp.bfloat16)
  y, _, _ = _run(layer, h)
  ref = numpy_reference(_params(layer), np.asarray(h, np.float32), False)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2,
                             atol=2e-2 * np.abs(ref).max())
