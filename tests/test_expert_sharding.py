"""Experts over the `expert` mesh axis (spec section 5) on 8 emulated CPU
devices: the ragged all-to-all (emulated on CPU) against its documented
semantics, and the MoE's loss, gradients and optimizer step on every
(data, expert) mesh equal to one device, with no expert weight gathered.

Tolerances are those of tests/test_sharding.py (float32 sums in another
order): loss 1e-6 relative, gradients 1e-5 of each parameter's largest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from test_sharding import MESHES, close, collectives, run
from ultramem_jax.config import ConfigError
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.model.moe import MoE
from ultramem_jax.parallel import expert_sharding as ES
from ultramem_jax.parallel.mesh import MeshConfig, check_layout, make_mesh, single_device_mesh, use_mesh
from ultramem_jax.parallel.rules import logical_to_mesh
from ultramem_jax.training.config import load_config

E, D, F = 8, 32, 16   # experts, d_model, expert width: (8, 32, 16) is a weight


def config(tmp_path, *extra):
  return load_config("configs/tiny_moe.yaml", [
      "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
      "model.vocab_size=257", "data.tokenizer=bytes", "data.seq_len=8",
      "data.batch_size=8", "optimizer.warmup_steps=0",
      f"train.run_dir={tmp_path / 'run'}", f"model.ffn.moe.num_experts={E}",
      "model.ffn.moe.top_k=2", f"model.ffn.moe.expert_dim={F}", *extra])


def ragged_reference(operands, outputs, in_off, send, out_off, recv):
  """The docstring of jax.lax.ragged_all_to_all, literally: device i's
  slice j goes to device j // (slices per device)."""
  x = len(operands)
  per = len(in_off[0]) // x
  result = [o.copy() for o in outputs]
  for src in range(x):
    for j in range(len(in_off[src])):
      dst = j // per
      rows = operands[src][in_off[src][j]:in_off[src][j] + send[src][j]]
      # The receiver's view: slice (src, j % per) of its recv_sizes.
      assert recv[dst][src * per + j % per] == send[src][j]
      result[dst][out_off[src][j]:out_off[src][j] + len(rows)] = rows
  return result


def test_ragged_all_to_all_emulation_matches_its_semantics():
  rng = np.random.default_rng(0)
  x, per, rows, cap = 4, 2, 10, 40
  send = rng.integers(0, 4, size=(x, x * per))          # sizes per (src, slice)
  in_off = np.cumsum(send, axis=1) - send + rng.integers(0, 2, size=(x, 1))
  # Receiver d stacks slices (src, k) in src-major order, with a gap of 1.
  recv = np.stack([send[:, d * per:(d + 1) * per].reshape(-1) for d in range(x)])
  recv_off = np.cumsum(recv + 1, axis=1) - recv - 1
  out_off = np.stack([[recv_off[j // per][s * per + j % per] for j in range(x * per)]
                      for s in range(x)])
  operands = rng.normal(size=(x, rows, 3)).astype(np.float32)
  outputs = np.full((x, cap, 3), -1.0, np.float32)
  want = ragged_reference(operands, outputs, in_off, send, out_off, recv)

  mesh = jax.make_mesh((x,), (ES.EXPERT,), devices=jax.devices()[:x],
                       axis_types=(jax.sharding.AxisType.Auto,))
  f = jax.shard_map(
      lambda *a: ES.ragged_all_to_all(*(t[0] for t in a), axis_name=ES.EXPERT,
                                      emulate=True)[None],
      mesh=mesh, in_specs=(P(ES.EXPERT),) * 6, out_specs=P(ES.EXPERT),
      check_vma=False)
  i32 = lambda t: jnp.asarray(t, jnp.int32)
  got = jax.jit(f)(jnp.asarray(operands), jnp.asarray(outputs), i32(in_off),
                   i32(send), i32(out_off), i32(recv))
  np.testing.assert_array_equal(np.asarray(got), np.stack(want))


def test_real_ragged_all_to_all_lowers_for_tpu_and_gpu():
  """XLA:CPU cannot run the real collective; it must still lower (with its
  transpose) for the accelerators, where it is used."""
  fn = lambda rows, sizes, w: rows @ w[0]

  def loss(x, experts, weights, w):
    return ES.expert_parallel(x, experts, weights, (w,), num_experts=E,
                              experts_fn=fn, emulate=False).sum()

  args = (jnp.ones((16, 4)), jnp.zeros((16, 2), jnp.int32), jnp.ones((16, 2)),
          jnp.ones((E, 4, 4)))
  with use_mesh(make_mesh(MeshConfig(data=2, expert=4))):
    traced = jax.jit(jax.grad(loss, argnums=(0, 3))).trace(*args)
    for platform in ("tpu", "cuda"):
      text = traced.lower(lowering_platforms=(platform,)).as_text()
      assert text.count("ragged_all_to_all") >= 2, platform


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  return run(config(tmp_path_factory.mktemp("one")), single_device_mesh())


@pytest.mark.parametrize("data,expert", MESHES)
def test_expert_mesh_equals_one_device(tmp_path, single, data, expert):
  loss0, grads0, _, after0, metrics0, _ = single
  cfg = config(tmp_path)
  loss, grads, placed, after, metrics, text = run(
      cfg, make_mesh(MeshConfig(data=data, expert=expert)))

  assert abs(loss - loss0) <= 1e-6 * abs(loss0)
  for path in grads0:
    close(grads[path][...], grads0[path][...])
  for key in ("loss", "grad_norm"):
    close(metrics[key], metrics0[key])
  # After one Adam step: see test_sharding for why entries with |g| near
  # eps are left out.
  lr = cfg.optimizer.lr * max(g.lr_multiplier
                              for g in cfg.optimizer.param_groups.values())
  for path in after0:
    a, b = np.asarray(after[path][...]), np.asarray(after0[path][...])
    grad = grads0.get(path[1:]) if path[0] == 0 else None
    sure = (np.abs(np.asarray(grad[...])) > 1e4 * cfg.optimizer.eps
            if grad is not None else np.ones(a.shape, bool))
    np.testing.assert_allclose(a[sure], b[sure], rtol=0, atol=1e-4 * lr,
                               err_msg=str(path))

  # Expert weights are placed as the rules say: E / expert experts each.
  weights = {p[-1]: v[...] for p, v in placed.items() if p[-1] in
             ("w_gate", "w_up", "w_down")}
  assert len(weights) == 3
  for name, w in weights.items():
    assert tuple(w.sharding.spec)[0] == logical_to_mesh(("expert",))[0]
    assert w.addressable_shards[0].data.shape[0] == E // expert, name

  # No all-gather produces an expert weight, whole or in part; the rows travel by all-to-all when experts are split.
  ops = collectives(text)
  gathered = {s for op, shapes in ops if op == "all-gather" for s in shapes}
  assert not [s for s in gathered if s[-2:] in ((D, F), (F, D))], gathered
  if expert > 1:
    assert "all-to-all" in {op for op, _ in ops}


def test_tokens_not_dividing_the_mesh(tmp_path):
  """Decoding 3 tokens on 8 devices pads with weight-0 tokens."""
  cfg = config(tmp_path).model
  x = jax.random.normal(jax.random.key(1), (1, 3, D))
  outputs = []
  for mesh in (single_device_mesh(), make_mesh(MeshConfig(data=2, expert=4))):
    with use_mesh(mesh):   # the same parameters: the same key on every mesh
      graph, state = nnx.split(MoE(cfg, 0, rngs=nnx.Rngs(0)))
      outputs.append(jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, x))
  want, got = outputs
  close(got, want)


def test_capacity_routing_refuses_expert_parallelism(tmp_path):
  cfg = config(tmp_path, "model.ffn.moe.capacity_factor=1.25")
  with pytest.raises(ConfigError, match="mesh.expert: 4 devices need dropless"):
    check_layout(cfg.model, {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4,
                             "memory": 1}, abstract_model(cfg))
