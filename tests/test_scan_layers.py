"""model.scan_layers: the stacked blocks under nnx.scan equal the unrolled
ones (loss, gradients, per-layer metrics, decoding) for the dense, MoE and
UltraMemV2 tiny models with the unrolled parameters copied into the stacked
layout; blocks that differ are refused at validation; a scanned run trains
from the train loop, resumes (with another remat policy), is evaluated, and
refuses to resume unrolled."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_remat import BATCH, MODELS
from test_robustness import quiet, small
from ultramem_jax.config import ConfigError
from ultramem_jax.evaluation.restore import restore_run
from ultramem_jax.model.config import validate_model
from ultramem_jax.model.kv_cache import KVCache
from ultramem_jax.model.transformer import Transformer, build_model, unstack_blocks
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.parallel.rules import RULES
from ultramem_jax.training.step import loss_fn
from ultramem_jax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS = 3


@pytest.fixture(scope="module")
def mesh():
  with use_mesh(single_device_mesh()) as m:
    yield m


def copy_into_stacked(unrolled: Transformer, stacked: Transformer) -> None:
  """Every variable of the stacked model set from the unrolled model's:
  ``blocks/<rest>`` is the stack over i of ``blocks/<i>/<rest>``."""
  source = dict(nnx.to_flat_state(nnx.state(unrolled)))
  target = nnx.state(stacked)
  for path, var in nnx.to_flat_state(target):
    if path[0] == "blocks":
      layers = [source[("blocks", i, *path[1:])].get_value() for i in range(LAYERS)]
      assert var.get_value().shape == (LAYERS, *layers[0].shape)
      var.set_value(jnp.stack(layers))
    else:
      var.set_value(source[path].get_value())
  nnx.update(stacked, target)


def both(name: str):
  """(unrolled model, scanned model holding its parameters)."""
  cfg = dataclasses.replace(MODELS[name], n_layers=LAYERS)
  unrolled = build_model(cfg, seed=0)
  scanned = build_model(dataclasses.replace(cfg, scan_layers=True), seed=1)
  copy_into_stacked(unrolled, scanned)
  return unrolled, scanned


@pytest.mark.parametrize("name", list(MODELS))
def test_scanned_equals_unrolled(mesh, name):
  unrolled, scanned = both(name)
  graphs = {k: nnx.split(m) for k, m in (("u", unrolled), ("s", scanned))}

  @jax.jit
  def run(states):
    out = {}
    for k, state in states.items():
      model = nnx.merge(graphs[k][0], state)
      (total, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, BATCH)
      out[k] = (total, metrics, grads)
    return out

  out = run({k: g[1] for k, g in graphs.items()})
  (tu, mu, gu), (ts, ms, gs) = out["u"], out["s"]
  np.testing.assert_allclose(float(ts), float(tu), rtol=1e-6, atol=1e-6)
  # Per-layer metrics under the unrolled paths, e.g. blocks/2/ffn/expert_load.
  assert set(ms) == set(mu) and any("blocks/2/" in k for k in mu) == (name != "dense")
  for key in mu:
    np.testing.assert_allclose(np.asarray(ms[key]), np.asarray(mu[key]),
                               rtol=1e-6, atol=1e-6, err_msg=key)
  ref = dict(nnx.to_flat_state(gu))
  for path, var in nnx.to_flat_state(gs):
    want = (np.stack([np.asarray(ref[("blocks", i, *path[1:])].get_value())
                      for i in range(LAYERS)])
            if path[0] == "blocks" else np.asarray(ref[path].get_value()))
    np.testing.assert_allclose(np.asarray(var.get_value()), want,
                               rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_stacked_layout_names_and_round_trip(mesh):
  unrolled, scanned = both("ultramem_v2")
  assert RULES["layers"] is None
  for _, var in nnx.to_flat_state(nnx.state(scanned.blocks, nnx.Param)):
    assert var.get_metadata()["out_sharding"][0] == "layers"
  unstack_blocks(scanned)
  assert [b.index for b in scanned.blocks] == list(range(LAYERS))
  for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(scanned)),
                            nnx.to_flat_state(nnx.state(unrolled))):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_scanned_decoding_equals_unrolled(mesh):
  unrolled, scanned = both("dense")
  cfg = dataclasses.replace(MODELS["dense"], n_layers=LAYERS)
  tokens = BATCH["inputs"]
  logits = {}
  for key, model in (("u", unrolled), ("s", scanned)):
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state):
      model = nnx.merge(graphdef, state)
      cache = KVCache.create(cfg, 2, 12)
      prefill, cache = model.extend(tokens[:, :6], cache)
      step, cache = model.extend(tokens[:, 6:7], cache)
      return prefill, step, cache.length

    *logits[key], length = decode(state)
    assert int(length) == 7
  for a, b in zip(logits["u"], logits["s"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory, why", [
    (dict(layers="1:2", heads=1), "skip layers"),
    (dict(layers="0,2"), "in 2 of the 3 blocks"),
    (dict(layers="all", share_values=True), "share_values"),
])
def test_blocks_that_differ_are_refused(memory, why):
  base = dataclasses.replace(MODELS["ultramem_v2"], n_layers=LAYERS)
  cfg = dataclasses.replace(base, scan_layers=True, memory=dataclasses.replace(
      base.memory, **memory))
  with pytest.raises(ConfigError, match="model.scan_layers") as e:
    validate_model(cfg)
  assert why in str(e.value) and "set model.scan_layers=false" in str(e.value)
  validate_model(dataclasses.replace(cfg, scan_layers=False))


MEMORY = ["model.memory.layers=all", "model.memory.n_keys=8",
          "model.memory.key_dim=8", "model.memory.top_m=4",
          "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
          "model.memory.init=released"]


def test_scanned_run_trains_resumes_evaluates_and_refuses_unrolled(tmp_path, text_dir):
  # Two blocks to stack (the shared small config has one).
  scan = ["model.n_layers=2", "model.scan_layers=true", "train.checkpoint_every=2",
          *MEMORY]
  first = train(small(tmp_path, text_dir, "train.steps=2", "model.remat=full",
                      *scan), log=quiet)
  later = train(small(tmp_path, text_dir, "train.steps=3",
                      "model.remat=save_dots_and_retrieval", *scan), log=quiet)
  assert sorted(first.losses) == [1, 2] and sorted(later.losses) == [3]
  assert all(np.isfinite(list(later.losses.values())))
  records = [json.loads(line) for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  keys = set().union(*records)
  for i in range(2):
    assert f"train/layers/blocks/{i}/memory/slot_utilisation" in keys
    assert f"train/layers/blocks/{i}/memory/score_top1" in keys
  # eval.py's restore (the final validation above ran its eval step on
  # the scanned model): the stacked parameters restore as saved.
  run = restore_run(tmp_path / "run", None, [])
  assert run.cfg.model.scan_layers and run.step == 3
  model, _ = nnx.merge(run.graphdef, run.state)
  assert model.scanned and model.blocks.attn_norm.scale.shape == (2, 32)
  assert np.isfinite(later.val_loss)
  with pytest.raises(ConfigError, match="model.scan_layers: the run has True") as e:
    train(small(tmp_path, text_dir, "train.steps=4", "model.n_layers=2", *MEMORY,
                "model.scan_layers=false"), log=quiet)
  assert "resume with model.scan_layers=True" in str(e.value)
