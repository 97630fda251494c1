"""Gradient accumulation (training/accumulate.py): k microbatches give the
objective, auxiliary losses, gradients, logged metrics and memory-layer
statistics of one batch of k times the size, for dense, MoE and UltraMemV2
models; a tiny UltraMemV2 run with train.grad_accum_steps=2 logs the
metrics of one with 1 (and the two runs' TFLOP/s and MFU records are
checked, see test_utilisation.py for the formula)."""

from __future__ import annotations

import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memory_variants import TRAIN_V2
from ultramem_jax.model.flops import config_flops
from ultramem_jax.model.memory.layer import MemoryStat
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.accumulate import accumulated_gradients
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import loss_fn
from ultramem_jax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
TRUNK = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2",
         "model.ffn.inner_dim=64", "model.vocab_size=64", "data.tokenizer=bytes",
         "data.seq_len=16", "data.batch_size=8", "optimizer.warmup_steps=1",
         "train.steps=5"]
CASES = {
    "dense": [],
    # Dropless top-2 of 8 experts, both auxiliary losses on.
    "moe": ["model.ffn.kind=moe", "model.ffn.moe.num_experts=8",
            "model.ffn.moe.top_k=2", "model.ffn.moe.expert_dim=16",
            "model.ffn.moe.load_balance_coef=0.1",
            "model.ffn.moe.z_loss_coef=0.01"],
    # Key-balance loss and core penalty on: every memory-layer term.
    "ultramem_v2": TRAIN_V2 + ["model.memory.init=released",
                               "model.memory.key_balance=0.1",
                               "model.memory.core_penalty=0.1",
                               "model.memory.core_penalty_tau=0.01"],
}
# Two scanned MoE blocks: the whole batch's routing fractions reach each
# layer of the stack (model.scan_layers slices them along the layers axis).
CASES["moe_scanned"] = CASES["moe"] + ["model.n_layers=2", "model.scan_layers=true"]
K = 4
TOL = dict(rtol=1e-6, atol=1e-6)


def _batch(weights: bool) -> dict:
  rng = np.random.default_rng(1)
  rows = rng.integers(0, 64, size=(8, 17)).astype(np.int32)
  batch = {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:])}
  if weights:  # task rows: a loss mask, unequal over the microbatches
    batch["weights"] = jnp.asarray(rng.random((8, 16)) < 0.3, jnp.float32)
  return batch


def _leaves(tree) -> dict[str, np.ndarray]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


@functools.cache
def built(name: str):
  """(config, graphdef, state) of a case, on one device."""
  cfg = load_config(REPO / "configs/tiny_dense.yaml", TRUNK + CASES[name])
  with use_mesh(single_device_mesh()):
    graphdef, state = create_state(cfg)
  return cfg, graphdef, state


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
  """(name, config, graphdef, state)."""
  with use_mesh(single_device_mesh()):
    yield (request.param, *built(request.param))


def test_microbatches_equal_the_whole_batch(case):
  name, cfg, graphdef, state = case
  batch = _batch(weights=name == "dense")

  @jax.jit
  def both(state, batch):
    whole_model, _ = nnx.merge(graphdef, state)
    (_, whole), g_whole = nnx.value_and_grad(loss_fn, has_aux=True)(whole_model, batch)
    micro_model, _ = nnx.merge(graphdef, state)
    _, micro, g_micro = accumulated_gradients(micro_model, batch, K)
    # What each of the K microbatches would log alone, for the check below.
    alone = jax.lax.map(
        lambda mb: loss_fn(nnx.merge(graphdef, state, copy=True)[0], mb)[1],
        jax.tree.map(lambda x: x.reshape(-1, K, *x.shape[1:]).swapaxes(0, 1),
                     batch))
    return (whole, g_whole, nnx.state(whole_model, MemoryStat),
            micro, g_micro, nnx.state(micro_model, MemoryStat), alone)

  whole, g_whole, s_whole, micro, g_micro, s_micro, alone = jax.device_get(
      both(state, batch))
  assert set(micro) == set(whole)
  for key in whole:
    np.testing.assert_allclose(micro[key], whole[key], err_msg=key, **TOL)
  grads_w, grads_m = _leaves(g_whole), _leaves(g_micro)
  assert grads_w.keys() == grads_m.keys()
  scale = max(np.abs(g).max() for g in grads_w.values())
  for key in grads_w:
    np.testing.assert_allclose(grads_m[key], grads_w[key], rtol=1e-6,
                               atol=1e-6 * scale, err_msg=key)
  for key, value in _leaves(s_whole).items():  # slot-use stamps, call counters
    np.testing.assert_array_equal(_leaves(s_micro)[key], value, err_msg=key)

  # The terms the design has to get right: averaging what the microbatches
  # log alone would miss them (so these checks can fail).
  naive = lambda key: np.mean(alone[key])
  nonlinear = {"moe": ["aux/load_balance"], "ultramem_v2": [
      "aux/key_balance", "layers/blocks/0/memory/out_rms_over_ffn"]}.get(name, [])
  for key in nonlinear:
    assert abs(naive(key) - whole[key]) > 1e-4 * abs(whole[key]), key
  if name == "dense":  # unequal loss-mask sums per microbatch
    assert abs(naive("loss") - whole["loss"]) > 1e-4 * whole["loss"]


def _records(run_dir: pathlib.Path) -> dict[int, dict]:
  """The train/* scalars of metrics.jsonl by step."""
  out: dict[int, dict] = {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    out.setdefault(r["step"], {}).update(
        {k: v for k, v in r.items() if k.startswith("train/")})
  return out


def test_train_run_with_two_microbatches_logs_the_same_metrics(tmp_path, text_dir,
                                                              capfd):
  """UltraMemV2 through train(): updates, Tucker refreshes and slot
  utilisation over 3 steps, then the validation loss. The same two runs
  check the utilisation log: TFLOP/s always, MFU with ``train.peak_tflops``
  (run 1) and n/a without, as on every CPU (run 2)."""
  common = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "model.ffn.inner_dim=64", "data.tokenizer=bytes", "data.seq_len=16",
            "data.batch_size=8", "data.val_fraction=0.1", "optimizer.warmup_steps=1",
            "train.log_every=1", "train.eval_every=1000", "train.steps=3",
            f"data.source={text_dir}", "model.memory.init=released", *TRAIN_V2]
  peak = 1e-4
  runs, logs, bars = {}, [], {}
  for k in (1, 2):
    cfg = load_config(REPO / "configs/tiny_dense.yaml", common + [
        f"train.run_dir={tmp_path / str(k)}", f"train.grad_accum_steps={k}",
        f"train.peak_tflops={peak if k == 1 else 0}"])
    result = train(cfg, log=logs.append)
    runs[k] = (_records(result.run_dir), result)
    bars[k] = capfd.readouterr().err
  (one, r1), (two, r2) = runs[1], runs[2]
  assert "gradient accumulation: each step runs 2 microbatches of 4 rows" in logs
  assert sorted(one) == sorted(two) == [1, 2, 3]
  timing = ("tokens_per_sec", "tflops", "mfu")
  for step in one:   # float32 on the CPU: Adam amplifies rounding a little
    tags = [t for t in one[step] if not any(w in t for w in timing)]
    assert "train/layers/blocks/0/memory/slot_utilisation" in tags
    assert set(tags) <= set(two[step])
    for tag in tags:
      np.testing.assert_allclose(two[step][tag], one[step][tag], rtol=2e-5,
                                 atol=1e-7, err_msg=f"{tag} at step {step}")
  np.testing.assert_allclose(r2.val_loss, r1.val_loss, rtol=2e-5)

  # Utilisation: TFLOP/s per device from the train FLOPs and tokens/s of
  # the same record, over the 8 CPU devices; MFU against the given peak.
  flops = config_flops(cfg).train
  for records, with_peak in ((one, True), (two, False)):
    for r in records.values():
      tflops = flops * r["train/tokens_per_sec"] / 8 / 1e12
      np.testing.assert_allclose(r["train/tflops_per_device"], tflops, rtol=1e-6)
      if with_peak:
        np.testing.assert_allclose(r["train/mfu"], tflops / peak, rtol=1e-6)
      else:
        assert "train/mfu" not in r
  assert any("peak 0.0001 TFLOP/s per device (train.peak_tflops)" in x for x in logs)
  assert r1.mfu == pytest.approx(r1.tflops_per_device / peak) and r2.mfu is None
  summary = json.loads((r2.run_dir / "summary.json").read_text())
  assert summary["mfu"] is None and summary["tflops_per_device"] > 0
  assert re.search(r"mfu=\d+(\.\d+)?%", bars[1]), bars[1][-300:]  # the bars
  assert "mfu=n/a" in bars[2], bars[2][-300:]
