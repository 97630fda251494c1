"""Training: overfitting, checkpoints, exact resume, run-directory safety,
learning-rate schedule and parameter groups."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.config import ConfigError
from ultramem_jax.data.pipeline import train_dataset
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.checkpoint import Checkpointer, abstract_like
from ultramem_jax.training.config import OptimizerConfig, ParamGroupConfig, load_config
from ultramem_jax.training.metrics import read_scalars
from ultramem_jax.training.optimizer import (lr_schedule, make_optimizer,
                                             multiplier_schedule, param_labels)
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import make_train_step
from ultramem_jax.training.trainer import train


def tiny_config(tmp_path, source, **train_overrides):
  overrides = [
      "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
      "model.ffn.inner_dim=64", f"data.source={source}", "data.tokenizer=bytes",
      "data.seq_len=32", "data.batch_size=8", "data.val_fraction=0.1",
      "optimizer.warmup_steps=2", "train.log_every=1", "train.eval_every=1000",
      "train.progress_bar=false", f"train.run_dir={tmp_path / 'run'}",
  ] + [f"train.{k}={v}" for k, v in train_overrides.items()]
  return load_config("configs/tiny_dense.yaml", overrides)


def test_overfits_one_batch(tmp_path, text_dir):
  cfg = tiny_config(tmp_path, text_dir, steps=60)
  cfg = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, vocab_size=257),
      optimizer=dataclasses.replace(cfg.optimizer, lr=1e-2))
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 257, size=(8, 33)).astype(np.int32)
  batch = {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:])}
  with use_mesh(single_device_mesh()):
    graphdef, state = create_state(cfg)
    step = make_train_step(graphdef)
    losses = []
    for _ in range(60):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(math.log(257), rel=0.05)
  assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_checkpoint_round_trip_is_exact(tmp_path, text_dir):
  cfg = tiny_config(tmp_path, text_dir, steps=10)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=257))
  rows = np.arange(40 * 33, dtype=np.int32).reshape(40, 33) % 257
  with use_mesh(single_device_mesh()):
    graphdef, state = create_state(cfg)
    step = make_train_step(graphdef)
    it = iter(train_dataset(rows, 8, seed=0))
    for _ in range(3):  # non-trivial optimizer moments and step count
      state, _ = step(state, {k: jnp.asarray(v) for k, v in next(it).items()})
    ckpt = Checkpointer(tmp_path / "ck", max_to_keep=2)
    ckpt.save(3, state, it, {"note": "x"})
    ckpt.wait()
    expected_next = next(it)
    _, fresh = create_state(cfg)
    fresh_it = iter(train_dataset(rows, 8, seed=0))
    restored, meta = ckpt.restore(3, abstract_like(fresh), fresh_it)
  assert meta == {"note": "x"}
  a, b = jax.tree.leaves(state), jax.tree.leaves(restored)
  assert len(a) == len(b) > 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(next(fresh_it)["inputs"], expected_next["inputs"])
  assert int(restored[1]["step"][...]) == 3


def test_resume_gives_bitwise_identical_losses(tmp_path, text_dir):
  full = train(tiny_config(tmp_path / "a", text_dir, steps=8, checkpoint_every=4),
               log=lambda s: None)
  cfg = tiny_config(tmp_path / "b", text_dir, steps=8, checkpoint_every=4)
  first = train(cfg, stop_at_step=4, log=lambda s: None)
  assert first.final_step == 4 and sorted(first.losses) == [1, 2, 3, 4]
  second = train(cfg, log=lambda s: None)
  assert sorted(second.losses) == [5, 6, 7, 8]
  resumed = {**first.losses, **second.losses}
  assert resumed == full.losses  # exact float equality, every step
  assert second.val_loss == full.val_loss
  assert full.losses[8] < full.losses[1]
  # The run's metrics log spans both sessions, for the loss plot.
  steps, values = read_scalars(tmp_path / "b" / "run" / "metrics.jsonl", "train/loss")
  assert dict(zip(steps, values)) == pytest.approx(full.losses, rel=1e-6)


def test_run_directory_is_never_clobbered(tmp_path, text_dir):
  cfg = tiny_config(tmp_path, text_dir, steps=3, checkpoint_every=3)
  train(cfg, log=lambda s: None)
  run = tmp_path / "run"
  before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
  with pytest.raises(ConfigError, match="train.resume: false.*latest step 3"):
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False)))
  changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64))
  with pytest.raises(ConfigError, match="model.d_model: the run has 32, this config 64"):
    train(changed)
  assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
  empty = tiny_config(tmp_path / "other", text_dir, resume=True)
  with pytest.raises(ConfigError, match="train.resume: true.*no checkpoint"):
    train(empty)
  assert not (tmp_path / "other" / "run").exists()


def test_lr_schedule_warmup_then_cosine():
  cfg = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  sched = lr_schedule(cfg, total_steps=110)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  # Halfway through the decay the cosine is at the midpoint of [0.1, 1].
  assert float(sched(60)) == pytest.approx(0.55, abs=1e-6)
  assert float(sched(110)) == pytest.approx(0.1)


def test_multiplier_decays_linearly_to_one():
  mult = multiplier_schedule(ParamGroupConfig(lr_multiplier=4.0,
                                              multiplier_decay_steps=100))
  assert [float(mult(s)) for s in (0, 50, 100, 500)] == [4.0, 2.5, 1.0, 1.0]
  assert float(multiplier_schedule(ParamGroupConfig(lr_multiplier=3.0))(999)) == 3.0


def test_param_groups_set_decay_and_learning_rate(tmp_path, text_dir):
  """With zero gradients AdamW's update is -lr * wd * param: exactly zero
  for the no-decay group, and scaled by the group's multiplier."""
  cfg = tiny_config(tmp_path, text_dir, steps=10)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=257))
  opt_cfg = dataclasses.replace(
      cfg.optimizer, lr=0.1, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.5,
      param_groups={"default": ParamGroupConfig(lr_multiplier=2.0),
                    "no_decay": ParamGroupConfig(weight_decay=False)})
  with use_mesh(single_device_mesh()):
    graphdef, state = create_state(cfg)
    model, _ = nnx.merge(graphdef, state)
    labels = param_labels(model)
    assert {v for v in labels.values()} == {"default", "no_decay"}
    norm_paths = [p for p, v in labels.items() if v == "no_decay"]
    assert norm_paths and all(p[-1] == "scale" for p in norm_paths)
    opt = make_optimizer(model, opt_cfg, total_steps=10)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, zeros)
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for path, old in before.items():
    if labels[path] == "no_decay":
      np.testing.assert_array_equal(after[path], old)
    else:
      np.testing.assert_allclose(after[path], old - 2.0 * 0.1 * 0.5 * old, rtol=1e-6)


def test_unknown_param_group_label_is_refused(tmp_path, text_dir):
  cfg = tiny_config(tmp_path, text_dir, steps=10)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=257))
  with use_mesh(single_device_mesh()):
    graphdef, state = create_state(cfg)
    model, _ = nnx.merge(graphdef, state)
    only_default = dataclasses.replace(cfg.optimizer,
                                       param_groups={"default": ParamGroupConfig()})
    with pytest.raises(ValueError, match=r"labelled \['no_decay'\]"):
      make_optimizer(model, only_default, total_steps=10)


def test_moe_aux_losses_join_the_objective_and_are_logged(tmp_path, text_dir):
  cfg = tiny_config(tmp_path, text_dir, steps=4, checkpoint_every=4)
  moe = dataclasses.replace(cfg.model.ffn.moe, num_experts=8, top_k=2, expert_dim=16)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, ffn=dataclasses.replace(cfg.model.ffn, kind="moe", moe=moe)))
  result = train(cfg, log=lambda s: None)
  metrics = tmp_path / "run" / "metrics.jsonl"
  _, loss = read_scalars(metrics, "train/loss")
  _, total = read_scalars(metrics, "train/total_loss")
  _, lb = read_scalars(metrics, "train/aux/load_balance")
  _, z = read_scalars(metrics, "train/aux/router_z")
  assert loss == pytest.approx(list(result.losses.values()))
  # The objective is the cross-entropy plus the summed auxiliary losses.
  np.testing.assert_allclose(total, np.add(np.add(loss, lb), z), rtol=1e-5)
  # Two MoE layers, each at least coef (1x coef means perfectly balanced).
  assert all(v >= 2 * 0.01 * 0.999 for v in lb)
  _, load_max = read_scalars(metrics, "train/layers/blocks/1/ffn/expert_load/max_over_mean")
  _, entropy = read_scalars(metrics, "train/layers/blocks/0/ffn/router_entropy")
  assert len(load_max) == 4 and all(v >= 1.0 for v in load_max)
  assert all(0 < v <= math.log(8) + 1e-5 for v in entropy)
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
  events.Reload()
  assert "train/layers/blocks/0/ffn/expert_load" in events.Tags()["histograms"]
