"""The memory layer against independent references, in float64: brute-force
retrieval, the per-token numpy reference of tests/memory_reference.py for
every variant (tests/memory_variants.py), and finite differences for every
gradient; the recipe builder's stages and refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memory_reference import reference_memory
from memory_variants import RECIPE_NAMES, VARIANTS
from ultramem_jax.config import ConfigError, to_dict
from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model.memory import retrieval as R
from ultramem_jax.model.memory.layer import MemoryLayer, MemoryTable
from ultramem_jax.model.memory.recipe import memory_recipe
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import from_dict

BASE = {"d_model": 16, "n_layers": 3, "n_heads": 2, "vocab_size": 32,
        "dtype": "float64", "param_dtype": "float64",
        "ffn": {"inner_dim": 32}}

def model_cfg(memory: dict, **extra):
  data = to_dict(from_dict({}))
  data["model"].update({**BASE, **extra})
  data["model"]["memory"].update(memory)
  return from_dict(data).model


def make_layer(cfg, index: int = 0, seed: int = 0):
  """A layer (and the shared table it reads, if any) with random cores and
  tables at unit scale, so that every term is far from zero."""
  rngs = nnx.Rngs(seed)
  layer = MemoryLayer(cfg, index, rngs=rngs, own_table=not cfg.memory.share_values)
  table = layer.table or MemoryTable(cfg, memory_geometry(cfg).table_rows, rngs=rngs)
  key = jax.random.key(seed + 100)
  for i, var in enumerate([table.values, table.pre_values]):
    if var is not None:
      var.value = jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)
  if layer.tucker:
    layer.cores.value = jax.random.normal(jax.random.fold_in(key, 9),
                                          layer.cores.shape, jnp.float64)
    layer.refresh_tucker()
  layer.query_norm.value = layer.query_norm[...] * 3.0
  return layer, table


def reference_inputs(layer, table, cfg):
  mem, geo = cfg.memory, memory_geometry(cfg)
  params = {"w_q": layer.w_q[...], "query_norm_scale": layer.query_norm[...],
            "key_norm_scale": layer.key_norm[...], "keys": layer.keys[...],
            "perm": layer.perm[...], "values": table.values[...]}
  for name in ("cores", "u", "v", "w_p", "w_o", "w_g"):
    if hasattr(layer, name):
      params[name] = getattr(layer, name)[...]
  if table.pre_values is not None:
    params["pre_values"] = table.pre_values[...]
  params = {k: np.asarray(v) for k, v in params.items()}
  ref_cfg = {f.name: getattr(mem, f.name) for f in dataclasses.fields(mem)}
  ref_cfg.update(prefilter_k=mem.k, value_dim=cfg.value_dim,
                 norm_eps=cfg.norm_eps, rows_per_layer=geo.rows_per_block,
                 offset=layer.offset, table_rows=geo.table_rows)
  return params, ref_cfg


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True), use_mesh(single_device_mesh()):
    yield


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_matches_per_token_reference(variant):
  cfg = model_cfg(VARIANTS[variant])
  index = 1 if cfg.memory.share_values else 0  # a window that wraps the ring
  layer, table = make_layer(cfg, index)
  h = np.random.default_rng(0).normal(size=(2, 5, cfg.d_model))
  call = nnx.jit(lambda lyr, x, tbl: lyr(x, tbl))
  got = np.asarray(call(layer, jnp.asarray(h), None if layer.table else table))
  params, ref_cfg = reference_inputs(layer, table, cfg)
  want = reference_memory(params, ref_cfg, h.reshape(-1, cfg.d_model))
  np.testing.assert_allclose(got.reshape(-1, cfg.d_model), want,
                             rtol=1e-9, atol=1e-12)
  assert np.abs(want).max() > 1e-3  # not a trivially zero output


@pytest.mark.parametrize("memory, sizes", [
    # (keys per side, rows R, slots of one value block, value blocks E)
    (dict(n_keys=2, key_expansion=2), (4, 4, 16, 1)),
    (dict(n_keys=2, key_expansion=2, value_expansion=4), (8, 4, 16, 4)),
    (dict(n_keys=2, key_expansion=3), (6, 4, 36, 1)),
    (dict(layers="0,1", n_keys=2, key_expansion=2, share_values=True), (4, 4, 16, 1)),
])
def test_key_expansion_geometry_and_fold(memory, sizes):
  """docs/memory-layers.md, "Key expansion": X*n keys per side, X*X*R
  slots per value block; slot q reads row (q mod R) + offset, block q div X*X*R."""
  cfg = model_cfg({"layers": "all", "top_m": 4, "prefilter_k": 2,
                   "value_dim": 8, "pre_value_dim": 4, **memory})
  geo = memory_geometry(cfg)
  assert (geo.keys_per_side, geo.rows_per_block, geo.block_slots,
          geo.blocks) == sizes
  ns = geo.keys_per_side
  perm = jnp.arange(ns * ns)[::-1]   # q = ns*ns - 1 - s
  rows, cols = jnp.array([3, 0, 1]), jnp.array([1, 2, 3])
  ring = geo.table_rows if cfg.memory.share_values else None
  offset = geo.block_offsets[-1]
  p, e, _ = R.addresses(rows, cols, perm, keys_per_side=ns,
                        rows_per_block=geo.rows_per_block, offset=offset,
                        table_rows=ring, block_slots=geo.block_slots)
  q = ns * ns - 1 - (rows * ns + cols)
  want_p = (q % geo.rows_per_block + offset) % geo.table_rows
  np.testing.assert_array_equal(p, want_p)
  np.testing.assert_array_equal(e, 0 if ring else q // geo.block_slots)
  if cfg.memory.share_values:
    assert offset == 4 and geo.table_rows == 8


def test_gelu_exact_layer_matches_per_token_reference():
  """value_activation: gelu_exact (the erf form, the released code's F.gelu)
  against the reference's math.erf, and not the tanh form."""
  memory = {**VARIANTS["ultramem_v2_gelu_4cores"], "value_activation": "gelu_exact"}
  cfg = model_cfg(memory)
  layer, table = make_layer(cfg)
  h = 2.0 * np.random.default_rng(1).normal(size=(2, 5, cfg.d_model))
  got = np.asarray(layer(jnp.asarray(h))).reshape(-1, cfg.d_model)
  params, ref_cfg = reference_inputs(layer, table, cfg)
  want = reference_memory(params, ref_cfg, h.reshape(-1, cfg.d_model))
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  tanh = reference_memory(params, {**ref_cfg, "value_activation": "gelu"},
                          h.reshape(-1, cfg.d_model))
  assert np.abs(want - tanh).max() > 1e-6


def subkey_scores_np(layer, h):
  """S_row, S_col [N, H, ns, r] straight from the parameters (numpy)."""
  def norm(x, scale, axis):
    return x / np.sqrt(np.mean(x ** 2, axis=axis, keepdims=True) + 1e-6) * scale
  q = np.einsum("nd,dqsrk->nqsrk", h, np.asarray(layer.w_q[...]))
  q = norm(q, np.asarray(layer.query_norm[...]), -1)
  kn = np.moveaxis(norm(np.moveaxis(np.asarray(layer.keys[...]), 3, -1),
                        np.asarray(layer.key_norm[...]), -1), -1, 3)
  q = np.broadcast_to(q, (q.shape[0], layer.heads) + q.shape[2:])
  s_row = np.einsum("nhrk,hjkr->nhjr", q[:, :, 0], kn[:, 0])
  s_col = np.einsum("nhrk,hjkr->nhjr", q[:, :, 1], kn[:, 1])
  return s_row, s_col


@pytest.mark.parametrize("k_equals_n", [True, False])
def test_retrieval_against_brute_force(k_equals_n):
  """K = ns: the kept slots are the top-m of all ns*ns full Tucker scores.
  K < ns: the top-m of the K x K grid of the pre-filter's top rows/columns."""
  ns, m = 7, 6
  cfg = model_cfg(dict(layers="all", n_keys=ns, key_dim=4, top_m=m,
                       prefilter_k=ns if k_equals_n else 3, tucker_cores=3,
                       heads=2, value_dim=6, pre_value_dim=6))
  layer, _ = make_layer(cfg, seed=3)
  h = np.random.default_rng(1).normal(size=(20, cfg.d_model))
  kept, _ = nnx.jit(lambda lyr, x: lyr.retrieve(x))(layer, jnp.asarray(h))
  s_row, s_col = subkey_scores_np(layer, h)
  cores = np.asarray(layer.cores[...])
  u, v = np.asarray(layer.u[...]), np.asarray(layer.v[...])
  for t in range(h.shape[0]):
    for hd in range(layer.heads):
      full = sum(s_row[t, hd] @ cores[c, hd] @ s_col[t, hd].T
                 for c in range(cores.shape[0]))  # [ns, ns]
      if k_equals_n:
        candidates = [(i, j) for i in range(ns) for j in range(ns)]
      else:
        rows = np.argsort(-(s_row[t, hd] @ u[hd]))[:3]
        cols = np.argsort(-(s_col[t, hd] @ v[hd]))[:3]
        candidates = [(i, j) for i in rows for j in cols]
      best = sorted(candidates, key=lambda p: -full[p])[:m]
      got = list(zip(np.asarray(kept.rows[t, hd]).tolist(),
                     np.asarray(kept.cols[t, hd]).tolist()))
      assert got == [tuple(map(int, p)) for p in best]
      np.testing.assert_allclose(np.asarray(kept.scores[t, hd]),
                                 [full[p] for p in best], rtol=1e-10)
      per_core = np.asarray(kept.core_scores[t, hd])
      np.testing.assert_allclose(
          per_core, [[s_row[t, hd, i] @ cores[c, hd] @ s_col[t, hd, j]
                      for c in range(3)] for i, j in best], rtol=1e-10)


@pytest.mark.parametrize("variant", ["ultramem_v2", "ultramem_v1", "memory_plus",
                                     "peer", "ultramem_v2_keyexp2_shared"])
def test_gradients_match_finite_differences(variant):
  """d/d(theta) of <Mem(h), R> along a random direction, for every
  parameter (queries via Wq and h, keys, norms, cores, values, pre-values,
  projections), against central differences."""
  cfg = model_cfg(VARIANTS[variant])
  layer, table = make_layer(cfg, 1 if cfg.memory.share_values else 0)
  shared = None if layer.table is not None else table
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(6, cfg.d_model)))
  proj = jnp.asarray(rng.normal(size=(6, cfg.d_model)))
  graphdef, params, rest = nnx.split((layer, shared), nnx.Param, ...)

  @jax.jit
  def loss(params, h, rest):
    lyr, tbl = nnx.merge(graphdef, params, rest)
    return jnp.sum(lyr(h, tbl) * proj)

  def f(params, h):
    return loss(params, h, rest)

  grads, grad_h = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, h, rest)
  flat_p = dict(nnx.to_flat_state(params))
  flat_g = dict(nnx.to_flat_state(grads))
  eps = 1e-6
  checked = []
  for path, var in flat_p.items():
    direction = jnp.asarray(rng.normal(size=var.shape))

    def shifted(sign):
      new = dict(flat_p)
      new[path] = var.replace(var[...] + sign * eps * direction)
      return f(nnx.from_flat_state(new), h)

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = jnp.sum(flat_g[path][...] * direction)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8,
                               err_msg="/".join(map(str, path)))
    checked.append("/".join(map(str, path)))
  dh = jnp.asarray(rng.normal(size=h.shape))
  numeric = (f(params, h + eps * dh) - f(params, h - eps * dh)) / (2 * eps)
  np.testing.assert_allclose(jnp.sum(grad_h * dh), numeric, rtol=1e-5)
  expected = {"w_q", "keys", "query_norm", "key_norm", "values"}
  expected |= {"cores"} if layer.tucker else set()
  expected |= {"pre_values"} if cfg.memory.pre_value_dim else set()
  expected |= {"w_p"} if cfg.memory.pre_value_dim and cfg.memory.pre_value_proj else set()
  expected |= {"w_o"} if cfg.memory.output_proj else set()
  expected |= {"w_g"} if cfg.memory.output_gate else set()
  assert expected <= {c.rsplit("/", 1)[-1] for c in checked}


def test_tucker_refresh_sign_rule_and_no_gradient():
  cfg = model_cfg(VARIANTS["ultramem_v2"])
  layer, _ = make_layer(cfg)
  u0, v0 = np.asarray(layer.u[...]), np.asarray(layer.v[...])
  c = np.asarray(layer.cores[...]).sum(0)[0]
  left, _, right = np.linalg.svd(c)
  # u, v are the leading singular vectors of the summed core, up to sign.
  assert np.allclose(np.abs(u0[0]), np.abs(left[:, 0]))
  assert np.allclose(np.abs(v0[0]), np.abs(right[0]))
  # The SVD's sign is arbitrary; the refresh keeps the previous one.
  layer.u.value, layer.v.value = -layer.u[...], -layer.v[...]
  layer.refresh_tucker()
  np.testing.assert_allclose(layer.u[...], -u0)
  np.testing.assert_allclose(layer.v[...], -v0)
  layer.refresh_tucker()
  np.testing.assert_allclose(layer.u[...], -u0)
  # u, v are buffers: the gradient does not reach them.
  grads = nnx.grad(lambda l: jnp.sum(l(jnp.ones((3, cfg.d_model)))))(layer)
  names = {p[-1] for p, _ in nnx.to_flat_state(grads)}
  assert "cores" in names and "u" not in names and "v" not in names


def test_align_signs_flips_only_when_closer():
  u, v = jnp.array([[0.6, 0.8]]), jnp.array([[0.8, 0.6]])
  fu, fv = R.align_signs(u, v, -u, -v)
  np.testing.assert_allclose(fu, -u)
  np.testing.assert_allclose(fv, -v)
  ku, kv = R.align_signs(u, v, jnp.zeros_like(u), jnp.zeros_like(v))  # a tie
  np.testing.assert_allclose(ku, u)
  np.testing.assert_allclose(kv, v)


@pytest.mark.parametrize("memory, key", [
    (dict(layers="all", top_m=40, prefilter_k=6, n_keys=8), "model.memory.top_m"),
    (dict(layers="all", top_m=4, prefilter_k=8, n_keys=8), None),
    (dict(layers="all", top_m=4, prefilter_k=9, n_keys=8), "model.memory.prefilter_k"),
    (dict(layers="all", n_keys=2, top_m=5, prefilter_k=2), "model.memory.top_m"),
    (dict(layers="all", value_dim=9, tucker_cores=2, pre_value_dim=4),
     "model.memory.value_dim"),
    (dict(layers="all", value_expansion=3), "model.memory.value_expansion"),
    (dict(layers="all", key_expansion=0), "model.memory.key_expansion"),
    (dict(layers="all", n_keys=4, top_m=4, prefilter_k=8, key_expansion=2), None),
    (dict(layers="all", tucker_rank=1, per_rank_queries=False),
     "model.memory.per_rank_queries"),
    (dict(layers="0:9"), "model.memory.layers"),
    (dict(layers="2:1"), "model.memory.layers"),
    (dict(layers="x"), "model.memory.layers"),
    (dict(layers="all", score="sum"), "model.memory.score"),
    (dict(layers="all", output_proj=False, value_dim=8), "model.memory.output_proj"),
    (dict(layers="all", pre_value_dim=0), "model.memory.value_init"),
])
def test_impossible_memory_shapes_are_refused(memory, key):
  full = {"layers": "all", "pre_value_dim": 8, "value_dim": 16, **memory}
  if key is None:
    model_cfg(full)  # K*K >= m with K <= ns: fine
    return
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    model_cfg(full)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_is_its_named_recipe(variant):
  recipe = memory_recipe(model_cfg(VARIANTS[variant]))
  assert recipe.name == RECIPE_NAMES[variant]
  layer, _ = make_layer(model_cfg(VARIANTS[variant]),
                        1 if VARIANTS[variant].get("share_values") else 0)
  assert layer.recipe == recipe and layer.tucker == recipe.retrieval.tucker


# One impossible combination per check of the recipe builder.
IMPOSSIBLE = [
    dict(value_dim=9, tucker_cores=2),
    dict(score="sum"),
    dict(tucker_rank=1, per_rank_queries=False),
    dict(normalize_scores="softmax"),
    dict(output_proj=False, value_dim=8),
    dict(pre_value_proj=False, pre_value_dim=8),
    dict(share_values=True, share_ratio=1.5),
    dict(share_values=True, value_expansion=4),
    dict(pre_value_dim=0),
]


@pytest.mark.parametrize("memory", IMPOSSIBLE, ids=lambda m: ",".join(m))
def test_recipe_refuses_what_validation_refuses(memory):
  """memory_recipe, given a config that skipped validation, raises the
  ConfigError that loading the same config raises, word for word."""
  full = {"layers": "all", "pre_value_dim": 8, "value_dim": 16, **memory}
  with pytest.raises(ConfigError) as loaded:
    model_cfg(full)
  valid = model_cfg({"layers": "all", "pre_value_dim": 8, "value_dim": 16})
  unchecked = dataclasses.replace(
      valid, memory=dataclasses.replace(valid.memory, **full))
  with pytest.raises(ConfigError) as built:
    memory_recipe(unchecked)
  assert str(built.value) == str(loaded.value)
