"""The Pallas kernels against their pure-JAX references (interpret mode on
the CPU, values and gradients, both backends' bodies), their lowering for
TPU and for GPU (Triton) without either, and the memory layer with
``model.memory.kernels: pallas`` against ``xla`` in a whole train step.

Tolerances: float32 results agree to 1e-5 relative to the largest value
(the kernels and references sum in different orders); with bfloat16 tables
both sides compute in float32 from the same bf16 rows and round the output
to bf16, so they agree to 2 bf16 ulps (1e-2 relative).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memory_variants import READ_CASES, TRAIN_V1, TRAIN_V2
from pallas_kernels import (product_key_topk, product_key_topk_reference,
                            value_read, value_read_reference)
from pallas_kernels.backend import default_backend
from pallas_kernels.lowering import lower_text
from ultramem_jax.config import ConfigError
from ultramem_jax.model.memory.layer import memory_layers, use_pallas
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import loss_fn, make_train_step

BACKENDS = ["tpu", "triton"]


def close(actual, expected, rtol):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-6)
  np.testing.assert_allclose(actual / scale, expected / scale, atol=rtol, rtol=0)


# --------------------------------------------------------------------------
# product_key_topk
# --------------------------------------------------------------------------


def topk_inputs(g=3, n_tok=13, r=2, dk=16, n=90, seed=0):
  """Sizes that divide no block size; keys 7 and 40 of group 0 equal key 5,
  so its pre-filter scores tie exactly (lowest index first, as top_k)."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (g, n_tok, r, dk))
  keys = jax.random.normal(ks[1], (g, n, r, dk))
  keys = keys.at[0, 7].set(keys[0, 5]).at[0, 40].set(keys[0, 5])
  # Make the tied key the best of token 0 in group 0, so the tie is kept.
  q = q.at[0, 0].set(keys[0, 5] * 3.0)
  u = jax.random.normal(ks[2], (g, r))
  return q, keys, jnp.abs(u)


@pytest.mark.parametrize("backend", BACKENDS)
def test_product_key_topk_matches_reference(backend):
  q, keys, u = topk_inputs()
  k = 12
  idx, scores = product_key_topk(q, keys, u, k, backend=backend, interpret=True)
  ref_idx, ref_scores = product_key_topk_reference(q, keys, u, k)
  np.testing.assert_array_equal(idx, ref_idx)
  assert list(np.asarray(idx[0, 0, :3])) == [5, 7, 40]   # the tie, in order
  close(scores, ref_scores, 1e-5)

  ct = jax.random.normal(jax.random.key(9), ref_scores.shape)
  def grads(fn):
    return jax.grad(lambda q, kk: jnp.sum(fn(q, kk)[1] * ct), argnums=(0, 1))(q, keys)
  got = grads(lambda q, kk: product_key_topk(q, kk, u, k, backend=backend,
                                             interpret=True))
  want = grads(lambda q, kk: product_key_topk_reference(q, kk, u, k))
  for a, b in zip(got, want):
    close(a, b, 1e-5)


def test_product_key_topk_rejects_bad_shapes():
  q, keys, u = topk_inputs()
  with pytest.raises(ValueError, match="k=91"):
    product_key_topk(q, keys, u, 91, interpret=True)
  with pytest.raises(ValueError, match="must agree"):
    product_key_topk(q[..., :8], keys, u, 4, interpret=True)


# --------------------------------------------------------------------------
# value_read
# --------------------------------------------------------------------------

# (name, cores hc, pre-values, activation, value blocks E): the reads of the
# variants the layer tests run (tests/memory_variants.py).
VARIANTS = READ_CASES


def read_inputs(hc, pre, e, dtype=jnp.float32, n=11, s=6, rows=9, dv=16, dp=8):
  """Few rows, so rows repeat across tokens; token 0 reads row 3 in every
  slot (duplicates within one token)."""
  ks = jax.random.split(jax.random.key(hc * 10 + e), 6)
  slots = jax.random.randint(ks[0], (n, s), 0, rows).at[0].set(3)
  args = dict(
      weights=jax.random.normal(ks[1], (n, s, hc)),
      values=jax.random.normal(ks[2], (rows, dv)).astype(dtype),
      z=jax.random.normal(ks[3], (n, dp)) if pre else None,
      pre_values=jax.random.normal(ks[4], (rows, dp)).astype(dtype) if pre else None)
  blocks = jax.random.randint(ks[5], (n, s), 0, e) if e > 1 else None
  return slots, blocks, args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,hc,pre,activation,e", VARIANTS,
                         ids=[v[0] for v in VARIANTS])
def test_value_read_matches_reference(backend, name, hc, pre, activation, e):
  slots, blocks, args = read_inputs(hc, pre, e)
  static = dict(activation=activation, blocks=blocks, num_blocks=e)
  out = value_read(slots, **args, **static, backend=backend, interpret=True)
  ref = value_read_reference(slots, **args, **static)
  assert out.shape == ref.shape == (slots.shape[0], e * args["values"].shape[1])
  close(out, ref, 1e-5)

  names = [k for k, v in args.items() if v is not None]
  ct = jax.random.normal(jax.random.key(1), ref.shape)
  def grads(fn):
    def f(*xs):
      return jnp.sum(fn(slots, **dict(zip(names, xs)), **static) * ct)
    return jax.grad(f, argnums=tuple(range(len(names))))(*[args[k] for k in names])
  got = grads(lambda *a, **kw: value_read(*a, **kw, backend=backend, interpret=True))
  want = grads(value_read_reference)
  for key, a, b in zip(names, got, want):
    assert a.shape == b.shape, key
    close(a, b, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_read_bfloat16_tables(backend):
  slots, _, args = read_inputs(2, True, 1, dtype=jnp.bfloat16)
  out = value_read(slots, **args, dtype=jnp.bfloat16, backend=backend,
                   interpret=True)
  ref = value_read_reference(slots, **args, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  close(out, ref, 1e-2)
  g = jax.grad(lambda v: jnp.sum(value_read(
      slots, args["weights"], v, z=args["z"], pre_values=args["pre_values"],
      backend=backend, interpret=True).astype(jnp.float32)))(args["values"])
  g_ref = jax.grad(lambda v: jnp.sum(value_read_reference(
      slots, args["weights"], v, z=args["z"], pre_values=args["pre_values"])))(
          args["values"])
  assert g.dtype == jnp.bfloat16
  close(g, g_ref, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_read_gelu_exact_matches_reference(backend):
  """The erf GELU (the released code's pre-value activation) in both
  bodies, values and gradients; the Triton body's erf is built from exp."""
  slots, _, args = read_inputs(2, True, 1)
  args["z"] = args["z"] * 2.0  # pre-value products out to |a| ~ 10
  out = value_read(slots, **args, activation="gelu_exact", backend=backend,
                   interpret=True)
  ref = value_read_reference(slots, **args, activation="gelu_exact")
  close(out, ref, 1e-5)
  tanh = value_read_reference(slots, **args, activation="gelu")
  assert np.max(np.abs(np.asarray(ref - tanh))) > 1e-4  # not the tanh form
  grad = lambda fn: jax.grad(lambda z: jnp.sum(fn(
      slots, args["weights"], args["values"], z=z, pre_values=args["pre_values"],
      activation="gelu_exact")))(args["z"])
  close(grad(lambda *a, **kw: value_read(*a, **kw, backend=backend,
                                         interpret=True)),
        grad(value_read_reference), 1e-5)


@pytest.mark.parametrize("platform,target,backend", [
    ("tpu", "tpu_custom_call", "tpu"),
    ("cuda", "__gpu$xla.gpu.triton", "triton"),
])
def test_gelu_exact_kernel_lowers(platform, target, backend):
  slots, _, args = read_inputs(1, True, 1, n=64, s=32, rows=100, dv=128, dp=128)

  def read(values, z):
    return jnp.sum(value_read(slots, args["weights"], values, z=z,
                              pre_values=args["pre_values"],
                              activation="gelu_exact", backend=backend))

  text = lower_text(read, args["values"], args["z"], platform=platform)
  assert kernel_calls(text, target) == 1


def test_value_read_rejects_bad_input():
  slots, _, args = read_inputs(3, False, 1)
  with pytest.raises(ValueError, match="not divisible by the 3 cores"):
    value_read(slots, args["weights"], args["values"], interpret=True)
  slots, _, args = read_inputs(1, True, 1)
  with pytest.raises(ValueError, match="z and pre_values go together"):
    value_read(slots, args["weights"], args["values"], z=args["z"], interpret=True)
  with pytest.raises(ValueError, match="num_blocks > 1 needs blocks"):
    value_read(slots, args["weights"], args["values"], num_blocks=2, interpret=True)


# --------------------------------------------------------------------------
# Lowering for TPU (Mosaic) and GPU (Triton) on a machine with neither
# --------------------------------------------------------------------------


def kernel_calls(text: str, target: str) -> int:
  return len(re.findall(rf"stablehlo\.custom_call @{re.escape(target)}\b", text))


@pytest.mark.parametrize("platform,target,backend", [
    ("tpu", "tpu_custom_call", "tpu"),
    ("cuda", "__gpu$xla.gpu.triton", "triton"),
])
def test_kernels_lower_for_accelerators(platform, target, backend):
  """Forward and backward, paper-like widths (Dv = 192 is not a power of
  two; the Triton path masks it) and bfloat16 tables."""
  slots, blocks, args = read_inputs(2, True, 1, dtype=jnp.bfloat16, n=64, s=32,
                                    rows=1000, dv=192, dp=192)

  def read(weights, values, z, pre_values):
    out = value_read(slots, weights, values, z=z, pre_values=pre_values,
                     activation="gelu", dtype=jnp.bfloat16, backend=backend)
    return jnp.sum(out.astype(jnp.float32))

  text = lower_text(jax.value_and_grad(read, argnums=(0, 1, 2, 3)),
                    *args.values(), platform=platform)
  # Forward read, backward row dots, and the forward kernel again for dz.
  assert kernel_calls(text, target) == 3

  q, keys, u = topk_inputs(g=4, n_tok=64, dk=64, n=360)

  def topk(q, keys):
    return jnp.sum(product_key_topk(q, keys, u, 32, backend=backend)[1])

  text = lower_text(jax.value_and_grad(topk, argnums=(0, 1)), q, keys,
                    platform=platform)
  assert kernel_calls(text, target) == 1


# --------------------------------------------------------------------------
# The memory layer: kernels: pallas == kernels: xla in a whole train step
# --------------------------------------------------------------------------

# UltraMemV2 reads memory in every block, so one block holds every code
# path compared here (and compiles in half the time of two); UltraMem v1's
# layer reads at block 0 and adds its output at block 1, so it keeps two.
V2 = TRAIN_V2 + ["model.memory.prefilter_k=3", "model.memory.value_activation=gelu",
                 "model.memory.key_balance=0.01", "model.memory.core_penalty=0.1",
                 "model.n_layers=1"]
V1 = TRAIN_V1
# Key expansion 2: 8 keys per side folded onto 16 rows (blocks summed).
V2_KEYEXP = TRAIN_V2 + ["model.memory.n_keys=4", "model.memory.key_expansion=2",
                        "model.n_layers=1"]


def tiny(tmp_path, memory, kernels):
  return load_config("configs/tiny_dense.yaml", [
      "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
      "model.ffn.inner_dim=64", "model.vocab_size=257", "data.tokenizer=bytes",
      "data.seq_len=8", "data.batch_size=2", "optimizer.warmup_steps=0",
      f"train.run_dir={tmp_path / 'run'}", *memory,
      "model.memory.init_samples=32", f"model.memory.kernels={kernels}",
      # The paper init's calibration pass changes no code path compared here.
      "model.memory.init=released"])


@pytest.mark.parametrize("memory", [V2, V1, V2_KEYEXP],
                         ids=["ultramem_v2", "ultramem_v1", "ultramem_v2_keyexp"])
def test_train_step_pallas_equals_xla(tmp_path, memory):
  rows = np.random.default_rng(0).integers(0, 257, size=(2, 9))
  batch = {"inputs": jnp.asarray(rows[:, :-1], jnp.int32),
           "targets": jnp.asarray(rows[:, 1:], jnp.int32)}
  with use_mesh(single_device_mesh()):
    graph_x, state = create_state(tiny(tmp_path, memory, "xla"))
    graph_p, _ = create_state(tiny(tmp_path, memory, "pallas"))
    model_p, _ = nnx.merge(graph_p, state)
    assert all(layer.use_pallas and layer.interpret
               for _, layer in memory_layers(model_p))

    def grads_and_step(graph):
      """The loss, its gradients and one full optimizer step (Tucker
      refresh and slot use included), all in one compiled program."""
      step = make_train_step(graph)

      @jax.jit
      def f(state):
        model, _ = nnx.merge(graph, state)
        value_and_grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        return value_and_grads, step(state, batch)[1]
      return f(state)

    ((loss_x, aux_x), grads_x), m_x = grads_and_step(graph_x)
    ((loss_p, aux_p), grads_p), m_p = grads_and_step(graph_p)
    assert abs(float(loss_x) - float(loss_p)) < 1e-6 * abs(float(loss_x))
    for key in aux_x:
      close(aux_p[key], aux_x[key], 1e-5)
    flat_x = dict(nnx.to_flat_state(grads_x))
    flat_p = dict(nnx.to_flat_state(grads_p))
    assert flat_x.keys() == flat_p.keys()
    for path in flat_x:
      close(flat_p[path][...], flat_x[path][...], 1e-5)
    for key in ("loss", "total_loss", "grad_norm"):
      close(m_p[key], m_x[key], 1e-5)
    for key in m_x:
      if key.endswith("slot_utilisation"):
        assert float(m_p[key]) == float(m_x[key])


def test_kernels_setting(tmp_path):
  assert use_pallas("xla") == (False, False)
  # On the CPU, auto is the pure-JAX path and pallas is interpreted.
  assert jax.default_backend() == "cpu" and default_backend() == "tpu"
  assert use_pallas("auto") == (False, False)
  assert use_pallas("pallas") == (True, True)
  with pytest.raises(ConfigError, match="model.memory.kernels"):
    tiny(tmp_path, V2, "cuda")
