"""eval.py generate: text from a checkpoint, with a key/value cache.

The prompts are run through the model in one call (prefill) that fills the
cache (model/kv_cache.py); then one jitted decode step, compiled once and
reused, feeds each sampled token back: ``(params, cache, token) ->
(next token, logits, cache)``. Sampling is greedy, temperature or top-p
(evaluation/sampling.py), drawn per prompt and position from ``--seed``.

Each prompt is preceded by the document separator ``<|endoftext|>``, as
every training document is, so an empty prompt starts a new document;
generation stops at ``--max_new_tokens`` or when every prompt has produced
the separator (which is not printed). Prompts of different lengths are
left-padded to the longest (padding is masked, positions start at each
prompt's own first token), and the batch is padded with copies of the last
prompt to a multiple of the run's data-parallel devices.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultramem_jax.config import ConfigError
from ultramem_jax.evaluation.restore import restore_run
from ultramem_jax.evaluation.sampling import sample, step_keys
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.kv_cache import KVCache
from ultramem_jax.parallel.mesh import use_mesh
from ultramem_jax.parallel.tokens import token_shards
from ultramem_jax.training.memory_budget import check_generate_memory
from ultramem_jax.training.metrics import Progress


def add_parser(sub) -> None:
  p = sub.add_parser("generate", help="sample text from a checkpoint")
  p.add_argument("--run_dir", required=True, type=pathlib.Path)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--prompt", action="append", default=[],
                 help="a prompt; repeat for a batch (default: one empty prompt)")
  p.add_argument("--prompt_file", type=pathlib.Path, default=None,
                 help="a file of prompts, one per non-empty line")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0 (the default) is greedy")
  p.add_argument("--top_p", type=float, default=1.0,
                 help="nucleus sampling: keep the most probable tokens "
                      "summing to at least this probability (1: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_progress", action="store_true",
                 help="no progress bar on stderr")
  p.add_argument("overrides", nargs="*", help="dotted.key=value")


@dataclasses.dataclass
class Generation:
  """Generated ids per prompt (the end token excluded) and timings."""
  tokens: list[list[int]]
  prefill_s: float          # prefill, including its compilation
  first_step_s: float       # the first decode step, including compilation
  decode_s: float           # the decode steps after the first
  decode_steps: int         # decode steps after the first
  batch: int                # rows per step (prompts plus batch padding)
  compiles: int             # traces of the decode step during this call

  @property
  def tokens_per_sec(self) -> float:
    """Decode throughput over the steps after the first, all rows."""
    return (self.decode_steps * self.batch / self.decode_s
            if self.decode_s > 0 else math.nan)


# Traces of extend_and_sample by phase ("prefill", "decode"): a Python side
# effect, so it counts compilations.
TRACES: collections.Counter = collections.Counter()


@functools.partial(jax.jit, donate_argnames="cache", static_argnames=(
    "graphdef", "temperature", "top_p", "phase"))
def extend_and_sample(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache,
                      tokens: jax.Array, rows: jax.Array, seed_key: jax.Array,
                      *, temperature: float, top_p: float, phase: str):
  """Runs tokens [B, T] after the cached ones and samples the next token of
  each row: (next [B], logits [B, T, V], cache). The prefill is this with
  the prompts, the decode step with T = 1 (`phase` names which, for
  ``TRACES``); `cache` is donated. Draws use ``step_keys(seed_key, rows,
  position of the drawn token)``; the seed is an argument, the sampling
  setting part of the program."""
  TRACES[phase] += 1
  model = nnx.merge(graphdef, params)
  logits, cache = model.extend(tokens, cache)
  keys = step_keys(seed_key, rows, cache.positions(1)[:, 0])
  return sample(keys, logits[:, -1], temperature, top_p), logits, cache


def check_sampling(temperature: float, top_p: float,
                   max_new_tokens: int = 1) -> None:
  """Raises ConfigError (exit status 2) for settings out of range."""
  if temperature < 0:
    raise ConfigError(f"--temperature: got {temperature}; must be >= 0 "
                      "(0 is greedy)")
  if not 0 <= top_p <= 1:
    raise ConfigError(f"--top_p: got {top_p}; must be in [0, 1]")
  if max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens: got {max_new_tokens}; must be >= 1")


class Sampler:
  """A model and a sampling setting: prefill, decode step and the loop.

  graphdef, params: the model alone (``nnx.split(model)``). The jitted
  function is shared by every Sampler: it compiles once per graph,
  sampling setting and shapes (the seed is an argument), so the decode
  step compiles once per (batch, cache length).
  """

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State,
               cfg: ModelConfig, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0):
    check_sampling(temperature, top_p)
    self.graphdef, self.params, self.cfg = graphdef, params, cfg
    self.settings = dict(temperature=float(temperature), top_p=float(top_p))
    self.seed_key = jax.random.key(seed)

  def prefill(self, tokens: np.ndarray, start: np.ndarray, max_len: int):
    """Left-padded prompts tokens [B, P] (row b's real tokens from slot
    start[b]) into a fresh cache of `max_len` slots: (next token [B],
    logits [B, P, V], cache)."""
    cache = KVCache.create(self.cfg, tokens.shape[0], max_len,
                           jnp.asarray(start, jnp.int32))
    return self._extend(cache, tokens, "prefill")

  def decode(self, cache: KVCache, token: jax.Array):
    """One token per row [B] after the cached ones: (next token [B],
    logits [B, V], cache). The cache passed in is donated."""
    token = jnp.asarray(token, jnp.int32)[:, None]
    nxt, logits, cache = self._extend(cache, token, "decode")
    return nxt, logits[:, 0], cache

  def _extend(self, cache: KVCache, tokens, phase: str):
    tokens = jnp.asarray(tokens, jnp.int32)
    rows = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    return extend_and_sample(self.graphdef, self.params, cache, tokens, rows,
                             self.seed_key, phase=phase, **self.settings)

  def generate(self, prompts: Sequence[np.ndarray], max_new_tokens: int, *,
               end_id: int | None = None, pad_id: int = 0,
               batch_multiple: int = 1, progress: bool = False) -> Generation:
    """Up to `max_new_tokens` tokens after each prompt (non-empty id
    arrays), stopping early once every prompt has produced `end_id`."""
    check_sampling(0.0, 1.0, max_new_tokens)
    n = len(prompts)
    rows = list(prompts) + [prompts[-1]] * (-n % batch_multiple)
    lengths = np.asarray([len(p) for p in rows])
    if lengths.min() < 1:
      raise ValueError("every prompt needs at least one token")
    width = int(lengths.max())
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, p in enumerate(rows):
      tokens[i, width - len(p):] = p
    start = width - lengths

    traces = TRACES["decode"]
    t0 = time.perf_counter()
    token, _, cache = self.prefill(tokens, start, width + max_new_tokens - 1)
    out = [np.asarray(token)]
    prefill_s = time.perf_counter() - t0
    done = out[-1][:n] == end_id
    bar = Progress(max_new_tokens, 1, progress)
    first_step_s, t1 = 0.0, time.perf_counter()
    for i in range(1, max_new_tokens):
      if done.all():
        break
      token, _, cache = self.decode(cache, token)
      out.append(np.asarray(token))
      done |= out[-1][:n] == end_id
      now = time.perf_counter()
      if i == 1:    # compiles the step
        first_step_s, t1 = now - t1, now
        bar.update(1)
      else:
        bar.update(1, tok_s=f"{(i - 1) * len(rows) / (now - t1):,.0f}")
    decode_steps = max(0, len(out) - 2)
    decode_s = time.perf_counter() - t1 if decode_steps else 0.0
    bar.close()

    ids = np.stack(out, axis=1)[:n]
    result = []
    for row in ids.tolist():
      if end_id is not None and end_id in row:
        row = row[:row.index(end_id)]
      result.append(row)
    return Generation(result, prefill_s, first_step_s, decode_s,
                      decode_steps, len(rows), TRACES["decode"] - traces)


# ------------------------------------------------------------------ command

def read_prompts(args: argparse.Namespace) -> list[str]:
  prompts = list(args.prompt)
  if args.prompt_file is not None:
    try:
      text = args.prompt_file.read_text()
    except OSError as e:
      raise ConfigError(f"--prompt_file: cannot read {str(args.prompt_file)!r}: "
                        f"{e.strerror}") from None
    prompts += [line for line in text.splitlines() if line.strip()]
  return prompts or [""]


def model_only(graphdef: nnx.GraphDef, state: nnx.State
               ) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and state out of a train state (model, optimizer)."""
  merged = nnx.merge(graphdef, state)
  model = merged[0] if isinstance(merged, tuple) else merged
  return nnx.split(model)


def _prompt_ids(tok, prompts: list[str]) -> list[np.ndarray]:
  """Each prompt's token ids after the separator."""
  return [np.concatenate([[tok.sep_id], p]).astype(np.int32)
          for p in tok.encode_batch(prompts)]


def run(args: argparse.Namespace) -> int:
  check_sampling(args.temperature, args.top_p, args.max_new_tokens)
  prompts = read_prompts(args)

  def check_fits(cfg, tok) -> None:
    """ConfigError when the key/value cache for the prompts and
    --max_new_tokens cannot fit (training/memory_budget.py), from the saved
    config and the abstract model: before anything is restored."""
    ids = _prompt_ids(tok, prompts)
    check_generate_memory(cfg, abstract_model(cfg), len(ids),
                          max(len(p) for p in ids), args.max_new_tokens)

  restored = restore_run(args.run_dir, args.step, args.overrides, check_fits)
  ids = _prompt_ids(restored.tokenizer, prompts)
  tok = restored.tokenizer
  cfg = restored.cfg
  longest = max(len(p) for p in ids) + args.max_new_tokens - 1
  if longest > cfg.data.seq_len:
    print(f"note: sequences reach {longest} tokens; the model was trained on "
          f"{cfg.data.seq_len} (data.seq_len)", file=sys.stderr)
  with use_mesh(restored.mesh):
    graphdef, params = model_only(restored.graphdef, restored.state)
    sampler = Sampler(graphdef, params, cfg.model, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed)
    gen = sampler.generate(ids, args.max_new_tokens, end_id=tok.sep_id,
                           pad_id=tok.sep_id,
                           batch_multiple=token_shards(restored.mesh),
                           progress=not args.no_progress)
  for i, (prompt, new) in enumerate(zip(prompts, gen.tokens)):
    print(f"=== sample {i + 1} of {len(prompts)} ===")
    print(prompt + tok.decode(new))
  total = sum(len(t) for t in gen.tokens)
  print(f"{args.run_dir} step {restored.step}: {total} new tokens for "
        f"{len(prompts)} prompt(s); prefill {gen.prefill_s:.2f}s, first decode "
        f"step {gen.first_step_s:.2f}s (both compile), then {gen.decode_steps} "
        f"steps x {gen.batch} rows in {gen.decode_s:.2f}s = "
        f"{gen.tokens_per_sec:,.0f} tokens/s; decode step compiled "
        f"{gen.compiles} time(s)", file=sys.stderr)
  return 0
