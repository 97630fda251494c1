"""Generation with a key/value cache (eval.py generate).

The cached path (a prefill, then one token per decode step) gives the same
logits as the full forward pass over the same prefix, for dense, MoE and
UltraMemV2 models, with left-padded prompts; the decode step is traced once.
Tolerance: float32, |cached - full| <= 1e-5 * max|full| + 1e-5 * |full|
(the cache sums attention over more, masked, slots in another order).
Sampling: greedy is the argmax, top-p -> 0 is greedy, top-p draws stay in
the nucleus, and draws are reproducible for a seed.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.evaluation import sampling
from ultramem_jax.evaluation.generate import TRACES, Sampler
from ultramem_jax.model.transformer import build_model
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.trainer import train

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.vocab_size=257", "data.tokenizer=bytes"]
MOE = ["model.ffn.moe.num_experts=8", "model.ffn.moe.top_k=2",
       "model.ffn.moe.expert_dim=16"]
V2 = ["model.ffn.inner_dim=64", "model.memory.layers=all", "model.memory.n_keys=6",
      "model.memory.key_dim=8", "model.memory.top_m=4", "model.memory.value_dim=16",
      "model.memory.pre_value_dim=16", "model.memory.init_samples=32"]
MODELS = {
    "dense": ("configs/tiny_dense.yaml", ["model.ffn.inner_dim=64"]),
    "moe": ("configs/tiny_moe.yaml", MOE),
    # The paper init's calibration only rescales parameters at build time
    # (and costs more than the rest of the test); the forward is the same.
    "ultramem_v2": ("configs/tiny_ultramem_v2.yaml",
                    V2 + ["model.memory.init=released"]),
}
sample = jax.jit(sampling.sample, static_argnums=(2, 3))
nucleus = jax.jit(sampling.nucleus)
step_keys = jax.jit(sampling.step_keys)
SEQ = np.random.default_rng(0).integers(0, 257, size=(2, 12)).astype(np.int32)


def split_model(name: str, tmp_path):
  path, overrides = MODELS[name]
  cfg = load_config(path, [*SMALL, *overrides, f"train.run_dir={tmp_path}"])
  graphdef, params = nnx.split(build_model(cfg.model, seed=0))
  return cfg.model, graphdef, params


@pytest.fixture
def mesh():
  with use_mesh(single_device_mesh()) as m:
    yield m


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def full_logits(graphdef, params, tokens) -> np.ndarray:
  return np.asarray(_forward(graphdef, params, jnp.asarray(tokens, jnp.int32)))


def assert_close(got, want):
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_equal_full_forward(mesh, tmp_path, name):
  """Row 0: a 5-token prompt; row 1: a 3-token prompt left-padded by 2.
  Both then get their next tokens one step at a time (teacher forcing)."""
  cfg, graphdef, params = split_model(name, tmp_path)
  want = full_logits(graphdef, params, SEQ)        # [2, 12, V]
  lengths = np.asarray([5, 3])
  prompts = np.zeros((2, 5), np.int32)             # padding: token 0
  prompts[0] = SEQ[0, :5]
  prompts[1, 2:] = SEQ[1, :3]
  sampler = Sampler(graphdef, params, cfg)
  _, logits, cache = sampler.prefill(prompts, 5 - lengths, max_len=12)
  assert_close(np.asarray(logits)[0], want[0, :5])
  assert_close(np.asarray(logits)[1, 2:], want[1, :3])
  before = TRACES["decode"]
  for j in range(7):
    pos = lengths + j
    _, logits, cache = sampler.decode(cache, SEQ[[0, 1], pos])
    assert_close(np.asarray(logits), want[[0, 1], pos])
    if j == 0:
      after_first = TRACES["decode"]
  assert int(cache.length) == 12
  assert after_first - before <= 1 and TRACES["decode"] == after_first  # traced once


def test_greedy_is_the_argmax_of_the_full_forward(mesh, tmp_path):
  cfg, graphdef, params = split_model("dense", tmp_path)
  prompt = SEQ[0, :4]
  sampler = Sampler(graphdef, params, cfg)
  gen = sampler.generate([prompt], 6)
  assert sampler.generate([prompt], 6).tokens == gen.tokens
  seq = np.zeros_like(SEQ)     # SEQ's shape: the program of the test above
  seq[0, :4] = prompt          # (logits at t see the tokens <= t only)
  for t in range(4, 10):
    seq[0, t] = np.argmax(full_logits(graphdef, params, seq)[0, t - 1])
  assert gen.tokens == [seq[0, 4:10].tolist()]
  assert gen.compiles <= 1 and gen.decode_steps == 4


def test_stops_at_the_end_token(mesh, tmp_path):
  cfg, graphdef, params = split_model("dense", tmp_path)
  prompt = SEQ[0, :4]
  sampler = Sampler(graphdef, params, cfg)
  free = sampler.generate([prompt], 6).tokens[0]
  stopped = sampler.generate([prompt], 6, end_id=free[2]).tokens[0]
  assert stopped == free[:free.index(free[2])]


def test_samples_are_reproducible_and_independent_of_the_batch(mesh, tmp_path):
  cfg, graphdef, params = split_model("dense", tmp_path)
  a, b = SEQ[0, :4], SEQ[1, :7]
  make = lambda seed: Sampler(graphdef, params, cfg, temperature=1.0,
                              top_p=0.9, seed=seed)
  alone = make(0).generate([a], 6)
  assert make(0).generate([a], 6).tokens == alone.tokens
  again = make(1).generate([a], 6)
  assert again.tokens != alone.tokens and again.compiles == 0  # seed: an input
  # Prompt a left-padded beside a longer prompt, and the batch padded to 4.
  batch = make(0).generate([a, b], 6, batch_multiple=4)
  assert batch.tokens[0] == alone.tokens[0] and batch.batch == 4


def test_top_p_near_zero_is_greedy():
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 3
  keys = jax.random.split(jax.random.key(1), 64)
  greedy = jnp.argmax(logits, axis=-1)
  np.testing.assert_array_equal(sample(keys, logits, 0.0), greedy)
  np.testing.assert_array_equal(sample(keys, logits, 1.0, top_p=1e-6), greedy)
  np.testing.assert_array_equal(sample(keys, logits, 0.7, top_p=0.0), greedy)


def test_top_p_draws_only_from_the_nucleus():
  ids = np.asarray([3, 0, 4, 1, 2])                   # ranked by probability
  probs = np.zeros(5)
  probs[ids] = [0.5, 0.25, 0.15, 0.06, 0.04]
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  for p, kept in [(0.0, {3}), (0.49, {3}), (0.7, {3, 0}), (0.74, {3, 0}),
                  (0.76, {3, 0, 4}), (0.95, {3, 0, 4, 1}), (1.0, {0, 1, 2, 3, 4})]:
    assert set(np.flatnonzero(np.asarray(nucleus(logits, p)))) == kept, p
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(sample(keys, jnp.broadcast_to(logits, (n, 5)), 1.0, 0.7))
  counts = np.bincount(draws, minlength=5)
  assert counts[[1, 2, 4]].sum() == 0
  # Renormalised within the nucleus: 2/3 and 1/3.
  assert counts[3] / n == pytest.approx(2 / 3, abs=0.03)


def test_nucleus_equals_the_sorted_definition():
  """Against ranking by sorting, on logits with many ties."""
  rng = np.random.default_rng(0)
  logits = np.round(rng.normal(size=(64, 40)) * 2) / 2   # ties in every row
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for p in [0.0, 0.05, 0.3, 0.55, 0.8, 0.97]:
    want = np.zeros(probs.shape, bool)
    for row, pr in enumerate(probs):
      order = np.lexsort((np.arange(len(pr)), -pr))    # by prob, then id
      ranked_above = np.cumsum(pr[order]) - pr[order]
      want[row, order] = (ranked_above < p) | (np.arange(len(pr)) == 0)
    np.testing.assert_array_equal(np.asarray(nucleus(logits, p)), want)


def test_draws_depend_on_seed_prompt_and_position_only():
  logits = jax.random.normal(jax.random.key(0), (4, 300))
  key = jax.random.key(7)
  rows, pos = jnp.arange(4), jnp.asarray([5, 5, 9, 2])
  first = sample(step_keys(key, rows, pos), logits, 1.0, 0.9)
  np.testing.assert_array_equal(sample(step_keys(key, rows, pos), logits, 1.0, 0.9),
                                first)
  other = sample(step_keys(jax.random.key(8), rows, pos), logits, 1.0, 0.9)
  assert not np.array_equal(np.asarray(other), np.asarray(first))
  # Row 2 alone draws what it drew in the batch.
  alone = sample(step_keys(key, rows[2:3], pos[2:3]), logits[2:3], 1.0, 0.9)
  assert int(alone[0]) == int(first[2])


# ----------------------------------------------------------------- command

def run_cli(*args):
  return subprocess.run([sys.executable, "eval.py", "generate", *map(str, args)],
                        capture_output=True, text=True, timeout=300)


def train_small_run(config: str, overrides: list[str], run_dir, text_dir,
                    steps: int = 3):
  """A run of `config` trained for `steps` steps on the test documents,
  with a final checkpoint and evaluation; returns `run_dir`."""
  cfg = load_config(config, [
      *overrides, "data.seq_len=32", "data.batch_size=8",
      "data.val_fraction=0.1", "optimizer.warmup_steps=1",
      f"train.steps={steps}", f"train.eval_every={steps}",
      f"train.checkpoint_every={steps}", "train.progress_bar=false",
      f"data.source={text_dir}", f"train.run_dir={run_dir}"])
  train(cfg, log=lambda s: None)
  return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, text_dir):
  return train_small_run("configs/tiny_dense.yaml", [
      "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
      "model.ffn.inner_dim=64", "data.bpe_vocab_size=300"],
      tmp_path_factory.mktemp("gen") / "run", text_dir)


def test_cli_generates_text(trained_run):
  proc = run_cli("--run_dir", trained_run, "--prompt", "The cat", "--prompt",
                 "A", "--max_new_tokens", "8", "--temperature", "0.8",
                 "--top_p", "0.9", "--seed", "1", "--no_progress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = proc.stdout.split("=== sample ")[1:]
  assert len(samples) == 2
  assert samples[0].startswith("1 of 2 ===\nThe cat")
  assert samples[1].startswith("2 of 2 ===\nA")
  assert "tokens/s" in proc.stderr
  assert "decode step compiled 1 time(s)" in proc.stderr


def test_cli_refuses_bad_arguments(tmp_path, capsys):
  main = importlib.import_module("eval").main     # eval.py, in this process
  assert main(["generate", "--run_dir", str(tmp_path / "nothing")]) == 2
  err = capsys.readouterr().err
  assert "--run_dir" in err and "has no config.yaml" in err
  assert main(["generate", "--run_dir", str(tmp_path), "--top_p", "1.5"]) == 2
  assert "--top_p: got 1.5" in capsys.readouterr().err
