"""train: the train step of every variant at the tiny matched sizes
(configs/tiny_*.yaml): tokens/s, compile time and compiled memory, with
ratios to the MoE."""

from __future__ import annotations

import time

import jax
import numpy as np
from tqdm import tqdm

from benchmarks.report import Result, Table
from benchmarks.timing import interleave, ms, pct
from ultramem_jax.model.abstract import resolved_vocab
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state, param_count
from ultramem_jax.training.step import make_train_step

VARIANTS = (("dense", "configs/tiny_dense.yaml"),
            ("MoE", "configs/tiny_moe.yaml"),
            ("UltraMem v1", "configs/tiny_ultramem.yaml"),
            ("UltraMemV2", "configs/tiny_ultramem_v2.yaml"),
            ("Memory+", "configs/tiny_memory_plus.yaml"),
            ("PKM", "configs/tiny_pkm.yaml"),
            ("PEER", "configs/tiny_peer.yaml"))
BASELINE = "MoE"
QUICK_VARIANTS = ("MoE", "UltraMemV2")
QUICK = ["data.batch_size=2", "data.seq_len=16", "model.n_layers=1",
         "model.d_model=32", "model.n_heads=2", "model.vocab_size=128",
         "model.ffn.inner_dim=32", "model.ffn.moe.num_experts=4",
         "model.ffn.moe.top_k=2", "model.ffn.moe.expert_dim=16",
         "model.memory.n_keys=8", "model.memory.key_dim=16",
         "model.memory.top_m=4", "model.memory.value_dim=16",
         "model.memory.pre_value_dim=16", "model.memory.init=released"]

DESCRIPTION = """\
One optimizer step (forward, backward, AdamW update, the memory layers'
Tucker refresh: `training/step.py`'s `make_train_step`) of each variant at
the CPU-sized matched configs (`configs/tiny_*.yaml`, matched in activated
and total non-embedding parameters; `configs/README.md`), on random tokens
of the configs' own batch (32 x 128). The variants are timed in turn
(dense, MoE, v1, V2, ..., dense, MoE, ...) in one process: median of the
timed steps and spread = (max - min) / median. Compile time is
`jit(...).lower(...).compile()`. Memory is XLA's analysis of the compiled
step (`compiled.memory_analysis()`: arguments + outputs - donated aliases +
temporaries), not the process's resident memory.
"""


def resolved_config(path: str, overrides: list[str] = ()):
  """The config at `path` with `overrides` and the tokenizer's vocabulary
  size filled in (no tokenizer is trained)."""
  cfg = load_config(path, list(overrides))
  return load_config(path, [*overrides, f"model.vocab_size={resolved_vocab(cfg)}"])


def _config(path: str, quick: bool):
  """The config at `path` resolved, or the `--quick` shapes."""
  return load_config(path, QUICK) if quick else resolved_config(path)


def random_batch(cfg, seed: int) -> dict:
  """Random next-token inputs and targets of the config's batch shape."""
  rng = np.random.default_rng(seed)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  vocab = resolved_vocab(cfg)
  return {"inputs": rng.integers(0, vocab, shape).astype(np.int32),
          "targets": rng.integers(0, vocab, shape).astype(np.int32)}


def compiled_step(cfg):
  """(step closure, compile seconds, XLA's memory bytes, parameters) of
  `cfg`'s train step on a real state and a random batch."""
  graphdef, state = create_state(cfg)
  batch = random_batch(cfg, cfg.train.seed)
  t0 = time.perf_counter()
  compiled = make_train_step(graphdef).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  nbytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.temp_size_in_bytes) if mem else 0
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics

  return step, compile_s, nbytes, param_count(state)


def _measure(names, cfgs: dict, quick: bool) -> tuple[dict, dict]:
  """(interleaved timings, (compile s, memory bytes, params) per variant)."""
  steps, info = {}, {}
  with use_mesh(single_device_mesh()):
    for n in tqdm(names, desc="train: compile", leave=False):
      steps[n], *info[n] = compiled_step(cfgs[n])
    t = interleave(steps, rounds=1 if quick else 12, min_rounds=1 if quick else 5,
                   budget_s=None if quick else 45.0, desc="train steps",
                   progress=not quick)
  return t, info


def run(quick: bool = False) -> Result:
  names = QUICK_VARIANTS if quick else [n for n, _ in VARIANTS]
  paths = dict(VARIANTS)
  cfgs = {n: _config(paths[n], quick) for n in names}
  t, info = _measure(names, cfgs, quick)
  base = t[BASELINE]
  rows, data = [], {}
  for n in names:
    compile_s, nbytes, params = info[n]
    tokens = cfgs[n].data.batch_size * cfgs[n].data.seq_len
    tok_s = tokens / t[n].median
    data[n] = {"tokens_per_s": tok_s, "compile_s": compile_s,
               "memory_bytes": nbytes, "params": params,
               "step_s": t[n].median, "spread": t[n].spread}
    rows.append([n, f"{params / 1e6:.2f}", ms(t[n].median), pct(t[n].spread),
                 f"{tok_s:,.0f}", f"{base.median / t[n].median:.2f}x",
                 f"{compile_s:.1f}", f"{compile_s / info[BASELINE][0]:.2f}x",
                 f"{nbytes / 2**20:.0f}",
                 f"{nbytes / info[BASELINE][1]:.2f}x"])
  table = Table(
      "Train step", ["variant", "params (M)", "step ms", "spread", "tokens/s",
                     "tokens/s vs MoE", "compile s", "compile vs MoE",
                     "memory MiB", "memory vs MoE"],
      rows, ["", "absolute", "", "absolute", "ratio", "absolute", "ratio", "",
             "ratio"],
      [f"Median of {base.n} interleaved steps each; memory MiB is XLA's "
       "analysis of the compiled step, which depends on the XLA version but "
       "not on the machine's speed."])
  batch = cfgs[names[0]].data
  setup = [f"configs: {', '.join(f'`{paths[n]}`' for n in names)}"
           + (f" with `--quick` overrides {' '.join(QUICK)}" if quick else ""),
           f"batch {batch.batch_size} x {batch.seq_len} tokens, random tokens, "
           f"{jax.devices()[0].platform}"]
  return Result("train", DESCRIPTION, setup, [table], data=data)
