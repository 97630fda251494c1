"""Value tables over the `memory` mesh axis (spec section 5) on 8 emulated
CPU devices: the same loss, gradients and optimizer step as one device for
every (data, memory) mesh, parameters placed by the rules table, and no
all-gather of a table in the compiled step.

Tolerance: 1e-5 of the largest gradient of each parameter (sums over
devices change the order of float32 additions); the loss to 1e-6.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.config import ConfigError
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.parallel.mesh import (MeshConfig, batch_sharding, check_layout, make_mesh,
                                        single_device_mesh, use_mesh)
from ultramem_jax.parallel.rules import logical_to_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import loss_fn, make_train_step

# 36 table rows (n = 6): no other array of the step has the table's shape.
V2 = ["model.memory.layers=all", "model.memory.n_keys=6", "model.memory.key_dim=8",
      "model.memory.top_m=4", "model.memory.value_dim=16",
      "model.memory.pre_value_dim=16", "model.memory.init_samples=32",
      # The paper init's calibration pass (a forward per mesh) changes no
      # sharded code path; the released init skips it.
      "model.memory.init=released"]
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def config(tmp_path, sharding="column", kernels="xla", extra=()):
  return load_config("configs/tiny_dense.yaml", [
      "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
      "model.ffn.inner_dim=64", "model.vocab_size=257", "data.tokenizer=bytes",
      "data.seq_len=8", "data.batch_size=8", "optimizer.warmup_steps=0",
      f"train.run_dir={tmp_path / 'run'}", *V2,
      f"model.memory.table_sharding={sharding}", f"model.memory.kernels={kernels}",
      *extra])


BATCH = np.random.default_rng(0).integers(0, 257, size=(8, 9))


def loss_and_grads(cfg, mesh):
  """Under `mesh` (entered by the caller): graph, state, the sharded batch,
  and the loss and gradients of the first step, jitted."""
  graph, state = create_state(cfg)
  batch = jax.device_put({"inputs": jnp.asarray(BATCH[:, :-1], jnp.int32),
                          "targets": jnp.asarray(BATCH[:, 1:], jnp.int32)},
                         batch_sharding(mesh))

  @jax.jit
  def grads(state, batch):
    model, _ = nnx.merge(graph, state)
    return nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)

  (loss, _), g = grads(state, batch)
  return graph, state, batch, loss, g


def run(cfg, mesh):
  """(loss, flat grads, placed state, state after one train step, its
  metrics, compiled text), all from one compiled program (grads and step)."""
  with use_mesh(mesh):
    graph, state = create_state(cfg)
    batch = jax.device_put({"inputs": jnp.asarray(BATCH[:, :-1], jnp.int32),
                            "targets": jnp.asarray(BATCH[:, 1:], jnp.int32)},
                           batch_sharding(mesh))
    step = make_train_step(graph)

    def grads_and_step(state, batch):
      model, _ = nnx.merge(graph, state)
      (loss, _), g = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
      return loss, g, *step(state, batch)

    compiled = jax.jit(grads_and_step).lower(state, batch).compile()
    loss, g, new_state, metrics = compiled(state, batch)
    placed = {path: v for path, v in nnx.to_flat_state(state)}
    return (float(loss), dict(nnx.to_flat_state(g)), placed,
            dict(nnx.to_flat_state(new_state)), metrics, compiled.as_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  return run(config(tmp_path_factory.mktemp("one")), single_device_mesh())


def close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(b)), 1e-12)
  np.testing.assert_allclose(a / scale, b / scale, atol=rtol, rtol=0)


def collectives(text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(op, result shapes) of every collective in compiled HLO text."""
  found = []
  for line in text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) (all-gather|all-to-all|"
                     r"reduce-scatter|all-reduce|collective-permute)(?:-start)?\(",
                     line)
    if match:
      shapes = [tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1))]
      found.append((match.group(2), shapes))
  return found


@pytest.mark.parametrize("sharding,data,memory",
                         [("column", d, m) for d, m in MESHES] + [("row", 2, 4)])
def test_mesh_equals_one_device(tmp_path, single, sharding, data, memory):
  loss0, grads0, _, after0, metrics0, _ = single
  mesh = make_mesh(MeshConfig(data=data, memory=memory))
  loss, grads, placed, after, metrics, text = run(config(tmp_path, sharding), mesh)

  assert abs(loss - loss0) <= 1e-6 * abs(loss0)
  assert grads.keys() == grads0.keys()
  for path in grads0:
    close(grads[path][...], grads0[path][...])
  # One optimizer step (Adam, Tucker refresh) lands on the same parameters.
  # Adam's first update is lr * g / (|g| + eps): where |g| is within a few
  # orders of eps it turns rounding of g into visible differences, so those
  # entries are left out; elsewhere the update is lr * sign(g) to 1e-4.
  for key in ("loss", "grad_norm"):
    close(metrics[key], metrics0[key])
  opt = config(tmp_path).optimizer
  lr = opt.lr * max(g.lr_multiplier for g in opt.param_groups.values())
  for path in after0:
    a, b = np.asarray(after[path][...]), np.asarray(after0[path][...])
    grad = (grads0.get(path[1:]) if path[0] == 0 else None)
    sure = (np.abs(np.asarray(grad[...])) > 1e4 * opt.eps if grad is not None
            else np.ones(a.shape, bool))
    np.testing.assert_allclose(a[sure], b[sure], rtol=0, atol=1e-4 * lr,
                               err_msg=str(path))

  # Every parameter is placed as the rules table says.
  tables = []
  for path, var in placed.items():
    names = var.get_metadata().get("out_sharding")
    if not names or not isinstance(var, nnx.Param):
      continue
    want = logical_to_mesh(names)
    got = var[...].sharding.spec
    assert tuple(got) + (None,) * (len(want) - len(got)) == tuple(want), path
    if path[-1] in ("values", "pre_values"):
      tables.append(var[...])
  assert len(tables) == 2   # values and pre-values of the one layer
  for table in tables:
    local = table.addressable_shards[0].data.shape
    assert (local == (36, 16 // memory) if sharding == "column"
            else local == (36 // memory, 16))

  # The compiled step never gathers a table: no all-gather produces its
  # full shape (or, in row mode, a column of full height).
  ops = collectives(text)
  assert ops, "no collectives parsed from the compiled step"
  gathered = {shape for op, shapes in ops if op == "all-gather" for shape in shapes}
  assert (36, 16) not in gathered
  # Nor every token's pre-filter scores [N, H, n] or K x K grids [N, H, K*K]
  # (top-k runs on each device's tokens).
  assert not gathered & {(64, 1, 6), (64, 1, 16)}, gathered
  if memory > 1:
    kinds = {op for op, _ in ops}
    assert ("all-to-all" in kinds) if sharding == "column" else ("reduce-scatter" in kinds)


def test_pallas_kernels_under_a_mesh(tmp_path, single):
  """The kernels run per shard inside shard_map (interpret mode)."""
  loss0, grads0, *_ = single
  mesh = make_mesh(MeshConfig(data=2, memory=4))
  with use_mesh(mesh):
    *_, loss, g = loss_and_grads(config(tmp_path, kernels="pallas"), mesh)
  assert abs(float(loss) - loss0) <= 1e-6 * abs(loss0)
  g = dict(nnx.to_flat_state(g))
  for path in grads0:
    close(g[path][...], grads0[path][...])


@pytest.mark.parametrize("sharding", ["column", "row"])
def test_keyexp_sharded_read_equals_one_device(tmp_path, sharding):
  """Key expansion 2 (12 keys per side folded onto the 36 rows): the read
  over a 2x4 mesh gives the one-device loss and gradients."""
  cfg = config(tmp_path, sharding, extra=["model.memory.key_expansion=2"])
  with use_mesh(single_device_mesh()):
    *_, loss0, g0 = loss_and_grads(cfg, single_device_mesh())
  mesh = make_mesh(MeshConfig(data=2, memory=4))
  with use_mesh(mesh):
    *_, loss, g = loss_and_grads(cfg, mesh)
  assert abs(float(loss) - float(loss0)) <= 1e-6 * abs(float(loss0))
  g0, g = dict(nnx.to_flat_state(g0)), dict(nnx.to_flat_state(g))
  assert g.keys() == g0.keys() and g0[next(p for p in g0 if p[-1] == "keys")][...].shape[2] == 12
  for path in g0:
    close(g[path][...], g0[path][...])


def test_column_sharding_needs_whole_cores(tmp_path):
  cfg = load_config("configs/tiny_ultramem_v2.yaml", [
      "model.memory.tucker_cores=2", f"train.run_dir={tmp_path / 'run'}"])
  with pytest.raises(ConfigError, match="tucker_cores=2 must divide"):
    check_layout(cfg.model, {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1,
                             "memory": 3}, abstract_model(cfg))
