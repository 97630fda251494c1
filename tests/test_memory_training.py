"""Memory layers in the model and the train step: placement, the per-step
Tucker refresh, checkpoints, the value learning rate, the optional losses
and the logged metrics."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memory_variants import TRAIN_V1 as V1
from memory_variants import TRAIN_V2 as V2
from ultramem_jax.data.pipeline import train_dataset
from ultramem_jax.model.memory import retrieval as R
from ultramem_jax.model.memory.layer import MemoryLayer, memory_layers
from ultramem_jax.model.transformer import build_model
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.checkpoint import Checkpointer, abstract_like
from ultramem_jax.training.config import load_config
from ultramem_jax.training.optimizer import param_labels
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import make_train_step
from ultramem_jax.training.trainer import train


def config(tmp_path, source="wiki", memory=V2, extra=()):
  return load_config("configs/tiny_dense.yaml", [
      "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
      "model.ffn.inner_dim=64", "model.vocab_size=257", f"data.source={source}",
      "data.tokenizer=bytes", "data.seq_len=32", "data.batch_size=8",
      "data.val_fraction=0.1", "optimizer.warmup_steps=0", "train.steps=20",
      "train.log_every=2", "train.eval_every=1000", "train.progress_bar=false",
      f"train.run_dir={tmp_path / 'run'}", *memory, *extra])


def random_batch(seed=0, batch=8, length=32):
  rows = np.random.default_rng(seed).integers(0, 257, size=(batch, length + 1))
  return {"inputs": jnp.asarray(rows[:, :-1], jnp.int32),
          "targets": jnp.asarray(rows[:, 1:], jnp.int32)}


@pytest.fixture
def mesh():
  with use_mesh(single_device_mesh()):
    yield


def test_skip_layer_adds_its_output_after_the_destination_block(tmp_path, mesh):
  """UltraMem v1 placement "0:1": Mem reads block 0's normalised FFN input
  and its output joins the residual after block 1, written out by hand."""
  cfg = config(tmp_path, memory=V1).model
  model = build_model(cfg, seed=0)
  b0, b1 = model.blocks
  assert b0.memory is not None and b1.memory is None and b0.memory_target == 1
  tokens = jnp.arange(24)[None] % cfg.vocab_size
  pos = jnp.arange(24)[None]
  x = jnp.take(model.token_embed[...], tokens, axis=0)
  x = x + b0.attn(b0.attn_norm(x), pos)
  h0 = b0.ffn_norm(x)
  x = x + b0.ffn(h0)
  mem = b0.memory(h0)
  x = x + b1.attn(b1.attn_norm(x), pos)
  x = x + b1.ffn(b1.ffn_norm(x))
  x = x + mem
  manual = model.final_norm(x) @ model.token_embed[...].T
  np.testing.assert_allclose(model(tokens), manual, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(mem).max()) > 0


def test_replace_ffn_drops_the_ffn_where_memory_reads(tmp_path, mesh):
  cfg = config(tmp_path, memory=V2 + ["model.memory.layers=1",
                                      "model.memory.replace_ffn=true"]).model
  model = build_model(cfg, seed=0)
  assert model.blocks[0].ffn is not None and model.blocks[0].memory is None
  assert model.blocks[1].ffn is None and model.blocks[1].memory is not None
  assert np.isfinite(np.asarray(model(jnp.zeros((1, 8), jnp.int32)))).all()


def test_train_step_refreshes_tucker_vectors_and_checkpoints_them(tmp_path, mesh):
  cfg = config(tmp_path, extra=["optimizer.lr=0.05"])
  graphdef, state = create_state(cfg)
  step = make_train_step(graphdef)
  model0, _ = nnx.merge(graphdef, state)
  u_init = {p: np.asarray(l.u[...]) for p, l in memory_layers(model0)}
  for i in range(3):
    state, _ = step(state, random_batch(i))
  model, _ = nnx.merge(graphdef, state)
  for path, layer in memory_layers(model):
    c = np.asarray(layer.cores[...], np.float64).sum(0)
    for hd in range(c.shape[0]):
      left, _, right = np.linalg.svd(c[hd])
      u, v = np.asarray(layer.u[...][hd]), np.asarray(layer.v[...][hd])
      # The leading singular pair of the updated cores, one common sign.
      sign = np.sign(u @ left[:, 0])
      np.testing.assert_allclose(u, sign * left[:, 0], atol=1e-5)
      np.testing.assert_allclose(v, sign * right[0], atol=1e-5)
    assert not np.array_equal(u_init[path], np.asarray(layer.u[...])), path

  ckpt = Checkpointer(tmp_path / "ck", max_to_keep=1)
  rows = np.arange(16 * 33, dtype=np.int32).reshape(16, 33) % 257
  ckpt.save(3, state, iter(train_dataset(rows, 8, seed=0)), {})
  ckpt.wait()
  _, fresh = create_state(cfg)
  restored, _ = ckpt.restore(3, abstract_like(fresh))
  model_r, _ = nnx.merge(graphdef, restored)
  for (_, a), (_, b) in zip(memory_layers(model), memory_layers(model_r)):
    for name in ("u", "v", "perm", "calls", "last_used", "cores"):
      np.testing.assert_array_equal(np.asarray(getattr(a, name)[...]),
                                    np.asarray(getattr(b, name)[...]))
    assert int(b.calls[...]) == 3


def test_values_have_their_own_learning_rate_multiplier(tmp_path, mesh):
  cfg = config(tmp_path, extra=[
      "optimizer.weight_decay=0", "optimizer.grad_clip=0", "optimizer.lr=0.01",
      "optimizer.param_groups.values.lr_multiplier=4",
      "optimizer.param_groups.values.multiplier_decay_steps=10"])
  graphdef, state = create_state(cfg)
  model0, _ = nnx.merge(graphdef, state)
  labels = param_labels(model0)
  table_labels = {v for k, v in labels.items() if k[-1] in ("values", "pre_values")}
  assert table_labels == {"values"}
  assert labels[("blocks", 0, "memory", "w_q")] == "default"
  flat = lambda m: {p: np.array(v.get_value(), copy=True)
                    for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  before = flat(model0)
  state, _ = make_train_step(graphdef)(state, random_batch())
  after = flat(nnx.merge(graphdef, state)[0])
  delta = {p: np.abs(after[p] - before[p]) for p in before}
  # Adam's first update is lr * g / (|g| + eps): lr per nonzero gradient.
  lr = 0.01
  mem = ("blocks", 0, "memory")
  assert float(delta[mem + ("w_q",)].max()) == pytest.approx(lr, rel=1e-3)
  assert float(delta[mem + ("keys",)].max()) == pytest.approx(lr, rel=1e-3)
  d_values = delta[mem + ("table", "values")]
  assert float(d_values.max()) == pytest.approx(4 * lr, rel=1e-3)
  assert float(delta[mem + ("table", "pre_values")].max()) == pytest.approx(4 * lr, rel=1e-3)


def test_ultramem_v1_config_decays_the_value_multiplier():
  cfg = load_config("configs/tiny_ultramem.yaml")
  group = cfg.optimizer.param_groups["values"]
  assert (group.lr_multiplier, group.multiplier_decay_steps) == (4.0, cfg.train.steps)
  v2 = load_config("configs/paper/ultramem_v2_227m.yaml")
  assert v2.optimizer.param_groups["values"].lr_multiplier == 1.0


def test_core_penalty_and_key_balance_formulas():
  rng = np.random.default_rng(0)
  cores = rng.uniform(size=(2, 3, 3, 3))
  tau = 0.15
  got = float(R.core_penalty(jnp.asarray(cores), tau))
  sv = np.linalg.svd(cores.sum(0), compute_uv=False)  # [heads, r]
  want = np.sum(np.maximum(sv[:, 1:] - tau, 0) ** 2) / (3 - 1)
  assert got == pytest.approx(want, rel=1e-5) and want > 0
  # Key balance: ns * sum_j f_j p_j, 1 exactly when p is uniform.
  a = jnp.zeros((5, 2, 10))
  top = jnp.asarray(rng.integers(0, 10, size=(5, 2, 3)))
  assert float(R.key_balance_loss(a, top)) == pytest.approx(1.0, rel=1e-6)
  a = jnp.asarray(rng.normal(size=(5, 2, 10)))
  p = np.exp(np.asarray(a)) / np.exp(np.asarray(a)).sum(-1, keepdims=True)
  f = np.bincount(np.asarray(top).ravel(), minlength=10) / top.size
  want = 10 * np.sum(f * p.reshape(-1, 10).mean(0))
  assert float(R.key_balance_loss(a, top)) == pytest.approx(want, rel=1e-5)


def test_optional_losses_join_the_objective(tmp_path, mesh):
  cfg = config(tmp_path, extra=["model.memory.core_penalty=10.0",
                                "model.memory.core_penalty_tau=0.0",
                                "model.memory.key_balance=0.01"])
  graphdef, state = create_state(cfg)
  _, metrics = make_train_step(graphdef)(state, random_batch())
  cp, kb = float(metrics["aux/core_penalty"]), float(metrics["aux/key_balance"])
  assert cp > 0 and kb > 0
  assert float(metrics["total_loss"]) == pytest.approx(
      float(metrics["loss"]) + cp + kb, rel=1e-6)
  # Off by default: nothing sown, the objective is the cross-entropy.
  graphdef, state = create_state(config(tmp_path))
  _, metrics = make_train_step(graphdef)(state, random_batch())
  assert not [k for k in metrics if k.startswith("aux/")]
  assert float(metrics["total_loss"]) == float(metrics["loss"])


def test_slot_utilisation_against_brute_force(tmp_path, mesh):
  cfg = config(tmp_path).model
  layer = MemoryLayer(cfg, 0, rngs=nnx.Rngs(0))
  rows_read = []
  for i in range(3):
    x = jax.random.normal(jax.random.key(i), (3 + i, cfg.d_model))
    kept, _ = layer.retrieve(x)
    _, _, local = R.addresses(kept.rows, kept.cols, layer.perm[...],
                              keys_per_side=layer.keys_per_side,
                              rows_per_block=layer.rows_per_block)
    rows_read.append(set(np.asarray(local).ravel().tolist()))
    layer(x)
  total = layer.rows_per_block
  for window in (1, 2, 3, 10):
    want = len(set().union(*rows_read[-window:])) / total
    assert float(layer.slot_utilisation(window)) == pytest.approx(want), window
  assert len(rows_read[-1]) < total  # the test can tell windows apart


@pytest.mark.parametrize("memory", [V2, V1], ids=["ultramem_v2", "ultramem_v1"])
def test_training_logs_memory_metrics(tmp_path, text_dir, memory):
  cfg = config(tmp_path, text_dir, memory=memory, extra=["train.steps=4"])
  result = train(cfg, log=lambda s: None)
  assert np.isfinite(result.val_loss)
  records = [json.loads(line) for line in
             (result.run_dir / "metrics.jsonl").read_text().splitlines()]
  logged = {k for r in records for k in r}
  prefix = "train/layers/blocks/0/memory/"
  for name in ("slot_utilisation", "score_top1", "score_topm", "core_sv1",
               "core_sv2", "out_rms_over_ffn"):
    assert prefix + name in logged, name
    values = [r[prefix + name] for r in records if prefix + name in r]
    assert len(values) == 4 and all(np.isfinite(values)), name
  util = [r[prefix + "slot_utilisation"] for r in records if prefix + "slot_utilisation" in r]
  assert all(0 < u <= 1 for u in util)
  # The tensorboard event file holds them too.
  assert list((result.run_dir / "tensorboard").iterdir())
