"""decode: the jitted KV-cache decode step of ``evaluation/generate.py``
(``Sampler.decode``, i.e. ``extend_and_sample``) for the paper's MoE and
UltraMemV2 pair, random weights, against the bytes ``inspect`` says a step
reads and the rate this machine streams them at."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from benchmarks import limits
from benchmarks.report import Result, Table
from benchmarks.timing import interleave, ms, pct
from ultramem_jax.decode_cost import decode_report
from ultramem_jax.evaluation.generate import Sampler
from ultramem_jax.inspect import decode_params
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.model.kv_cache import KVCache
from ultramem_jax.model.transformer import build_model
from ultramem_jax.parallel.host_tables import tables_to_host
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.memory_budget import available_bytes

MODELS = (("MoE", "configs/paper/moe_227m.yaml"),
          ("UltraMemV2", "configs/paper/ultramem_v2_227m.yaml"))
CONTEXT = 128
BATCHES = (1, 8, 64, 256)
DTYPES = ("float32", "bfloat16")
# Quick: the same two files shrunk to one small block each.
QUICK = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2",
         "model.vocab_size=512", "model.ffn.inner_dim=96",
         "model.ffn.moe.num_experts=8", "model.ffn.moe.top_k=2",
         "model.ffn.moe.expert_dim=32", "model.memory.n_keys=12",
         "model.memory.key_dim=16", "model.memory.top_m=4",
         "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
         "model.memory.init=released"]
QUICK_CONTEXT, QUICK_BATCHES, QUICK_DTYPES = 8, (1, 2), ("float32",)
# UltraMemV2 with its tables in device memory and in host memory
# (model.memory.table_memory, host_read), float32, timed in turn.
HOST_BATCHES = (1, 8, 64)
HOST_VARIANTS = (("device", []),
                 ("host rows", ["model.memory.table_memory=host",
                                "model.memory.host_read=rows"]),
                 ("host sum", ["model.memory.table_memory=host",
                               "model.memory.host_read=sum"]))

DESCRIPTION = f"""\
One decode step (one new token per row after {CONTEXT} cached tokens) of
`configs/paper/moe_227m.yaml` and `configs/paper/ultramem_v2_227m.yaml`
(random weights, parameters in float32, compute in float32 or bfloat16 by
`model.dtype`), timed through the project's own jitted step
(`Sampler.decode` of `ultramem_jax/evaluation/generate.py`, which calls
`extend_and_sample`), so it measures whatever decode code is in the tree.
The two models are timed in turn (MoE, V2, MoE, V2, ...) in one process:
median of the timed steps, spread = (max - min) / median. Both have the same
attention trunk, so they share one cache buffer (its content does not change
a step's cost), reset to {CONTEXT} cached tokens before every step.

Bytes per step are `inspect`'s (`ultramem_jax/decode_cost.py`, with
`data.seq_len={CONTEXT}`): parameter bytes read (dense weights, touched
experts `min(B*k, E)` or value rows `min(B*m, R)`) and the KV cache.
Effective GB/s is (parameter + cache bytes) / time. The limit is the rate
XLA reaches on a plain dense matmul [B, 768] x [768, 40960] of the same
batch and dtype (float32 weights, multiplied as the models' own dots do:
`model/common.weight_dot`, unrounded under bfloat16 compute on the CPU),
measured here, with a large copy and a
matrix-vector product for the machine's stream bandwidth; "x of limit" is
the step's time over (bytes / limit): 1 would be a step that streams its
bytes as fast as a dense matmul does.

Host tables: the same UltraMemV2 step in float32 with its value and
pre-value tables in device memory and in host memory
(`model.memory.table_memory=host`, with `host_read=rows`: the host gathers
the kept rows and the device sums them, or `host_read=sum`: the host also
sums), the same weights, timed in turn. On a CPU host and device memory are
one, so this measures the mechanism's overhead (the host computations and
their hand-offs), not a transfer; "moved" is `inspect`'s count of what
crosses between host and device per step.
"""


def model_config(path: str, dtype: str, context: int, quick: bool,
                 extra: list[str] | None = None):
  """The root config of a benchmarked model: `path` with `model.dtype`
  and `data.seq_len` (the context inspect's cache bytes are counted at)."""
  overrides = [f"model.dtype={dtype}", f"data.seq_len={context}", *(extra or [])]
  return load_config(path, (QUICK if quick else []) + overrides)


def step_bytes(cfg, batches) -> list[dict]:
  """``inspect``'s decode figures for `cfg` at each batch."""
  return decode_report(cfg, decode_params(abstract_model(cfg)), tuple(batches))


def _fits(nbytes: int, spare: float) -> tuple[bool, str]:
  """Whether `nbytes` more, times `spare` (room for what is allocated
  beside them) plus 1 GB, fit in the memory available now."""
  need, (have, _) = spare * nbytes + 1e9, available_bytes()
  return (not have or need <= have), (f"needs ~{need / 1e9:.1f} GB more, "
                                      f"{have / 1e9:.1f} GB available")


def _param_bytes(cfg) -> int:
  return sum(p.size * p.itemsize for p in decode_params(abstract_model(cfg)))


def _split(cfg, built: dict, name: str):
  """(graphdef, params) of `cfg`'s model with random weights. The weights
  are built once per model and reused under another compute dtype when the
  state's structure is the same (parameters stay float32 in both)."""
  graphdef = nnx.split(abstract_model(cfg))[0]
  if name in built:
    params, want = built[name], nnx.split(abstract_model(cfg))[1]
    shapes = lambda t: (jax.tree.structure(t),
                        [(x.shape, x.dtype) for x in jax.tree.leaves(t)])
    if shapes(params) == shapes(want):
      return graphdef, params
  graphdef, built[name] = nnx.split(build_model(cfg.model, cfg.train.seed))
  return graphdef, built[name]


def _cache_at(cache: KVCache, context: int) -> KVCache:
  """The cache holding `context` tokens again (the next write goes there)."""
  return cache.replace(length=jnp.asarray(context, jnp.int32))


def _time_batch(samplers, cfg_model, batch: int, context: int, quick: bool):
  """Interleaved step times of every sampler at `batch`."""
  vocab = cfg_model.vocab_size
  tokens = jnp.asarray(np.random.default_rng(batch).integers(0, vocab, batch),
                       jnp.int32)
  holder = {"cache": KVCache.create(cfg_model, batch, context + 1)}

  def step(sampler):
    def run():
      cache = _cache_at(holder["cache"], context)
      nxt, logits, holder["cache"] = sampler.decode(cache, tokens)
      return nxt, logits, holder["cache"]
    return run

  fns = {name: step(s) for name, s in samplers.items()}
  if quick:
    return interleave(fns, rounds=1, progress=False)
  return interleave(fns, rounds=15, min_rounds=3, budget_s=20.0,
                    desc=f"decode B={batch}")


def _measure(quick: bool) -> dict:
  context = QUICK_CONTEXT if quick else CONTEXT
  batches = QUICK_BATCHES if quick else BATCHES
  out = {"context": context, "cells": [], "limits": {}}
  copy = limits.copy_rate(16 << 20 if quick else limits.COPY_BYTES,
                          rounds=2 if quick else 5)
  out["copy_bytes_per_s"] = copy
  built: dict = {}
  for dtype in tqdm(QUICK_DTYPES if quick else DTYPES, desc="decode dtypes",
                    leave=False):
    cfgs = [model_config(path, dtype, context, quick) for _, path in MODELS]
    # Both models' parameters, unless built already (for the other dtype).
    ok, why = _fits(sum(_param_bytes(c) for (n, _), c in zip(MODELS, cfgs)
                        if n not in built), 1.05)
    if not ok:
      out["cells"] += [{"dtype": dtype, "batch": b, "skipped": why,
                        "bytes": {n: step_bytes(c, [b])[0]
                                  for (n, _), c in zip(MODELS, cfgs)}}
                       for b in batches]
      continue
    with use_mesh(single_device_mesh()):
      samplers = {}
      for (name, _), cfg in zip(MODELS, cfgs):
        samplers[name] = Sampler(*_split(cfg, built, name), cfg.model)
      for batch in batches:
        rounds = 2 if quick else 5
        f = limits.MATMUL_F // 16 if quick else limits.MATMUL_F
        rate = limits.matmul_rate(batch, dtype, f=f, rounds=rounds)
        out["limits"][(dtype, batch)] = rate
        cell = {"dtype": dtype, "batch": batch, "limit": rate,
                "bytes": {n: step_bytes(c, [batch])[0]
                          for (n, _), c in zip(MODELS, cfgs)}}
        ok, why = _fits(cell["bytes"][MODELS[0][0]]["kv_cache_bytes"]
                        * (context + 1) // context, 1.5)
        if not ok:
          cell["skipped"] = why
        else:
          cell["timing"] = _time_batch(samplers, cfgs[0].model, batch,
                                       context, quick)
        out["cells"].append(cell)
      del samplers
  out["host"] = _measure_host(built, quick)
  del built
  gc.collect()
  return out


def _measure_host(built: dict, quick: bool) -> list[dict]:
  """Interleaved step times of UltraMemV2 with device and host tables (the
  same float32 weights; the host copy of the tables is made here)."""
  context = QUICK_CONTEXT if quick else CONTEXT
  name, path = MODELS[1]
  cfgs = {label: model_config(path, "float32", context, quick, extra)
          for label, extra in HOST_VARIANTS}
  batches = QUICK_BATCHES if quick else HOST_BATCHES
  bytes_ = {b: {label: step_bytes(c, [b])[0] for label, c in cfgs.items()}
            for b in batches}
  ok, why = _fits(_param_bytes(cfgs["device"]) * (1 if name in built else 2), 1.05)
  if not ok:
    return [{"batch": b, "skipped": why, "bytes": bytes_[b]} for b in batches]
  cells = []
  with use_mesh(single_device_mesh()):
    graphdef, params = _split(cfgs["device"], built, name)
    host_params = tables_to_host(params)
    samplers = {}
    for label, cfg in cfgs.items():
      host = cfg.model.memory.table_memory == "host"
      samplers[label] = Sampler(nnx.split(abstract_model(cfg))[0],
                                host_params if host else params, cfg.model)
    for batch in batches:
      cells.append({"batch": batch, "bytes": bytes_[batch],
                    "timing": _time_batch(samplers, cfgs["device"].model,
                                          batch, context, quick)})
    del samplers, host_params
  return cells


def mb(nbytes: int) -> str:
  """Bytes as 10^6-byte megabytes, one decimal."""
  return f"{nbytes / 1e6:,.1f}"


def kb(nbytes: int) -> str:
  """Bytes as 10^3-byte kilobytes, one decimal."""
  return f"{nbytes / 1e3:,.1f}"


def _tables(out: dict) -> list[Table]:
  (a, _), (b, _) = MODELS
  times, bytes_ = [], []
  for c in out["cells"]:
    label = [c["dtype"], str(c["batch"])]
    by = c["bytes"]
    kv = by[a]["kv_cache_bytes"]
    limit = c.get("limit")
    brow = [mb(by[a]["param_bytes"]), mb(by[b]["param_bytes"]), mb(kv),
            f"{limit / 1e9:.1f}" if limit else ""]
    if "skipped" in c:
      times.append(label + [f"skipped: {c['skipped']}"] + [""] * 6)
      bytes_.append(label + brow + [""] * 4)
      continue
    t = c["timing"]
    row = []
    for name in (a, b):
      row += [ms(t[name].median), pct(t[name].spread), f"{t[name].first_s:.1f}"]
    times.append(label + row + [f"{t[a].median / t[b].median:.2f}x"])
    for name in (a, b):
      total = by[name]["param_bytes"] + kv
      brow += [f"{total / t[name].median / 1e9:.1f}",
               f"{t[name].median / (total / limit):.1f}x"]
    bytes_.append(label + brow)
  time_table = Table(
      "Time per decode step",
      ["dtype", "batch", f"{a} ms", f"{a} spread", f"{a} first s",
       f"{b} ms", f"{b} spread", f"{b} first s", f"{b} speed-up over {a}"],
      times, ["", "absolute", "", "absolute", "absolute", "", "absolute",
              "ratio"],
      ["first s: the first step, which compiles it."])
  byte_table = Table(
      "Bytes per step against this machine's limit",
      ["dtype", "batch", f"{a} param MB", f"{b} param MB", "KV cache MB",
       "limit GB/s", f"{a} GB/s", f"{a} x of limit", f"{b} GB/s",
       f"{b} x of limit"],
      bytes_, ["", "", "", "", "absolute", "absolute", "ratio", "absolute",
               "ratio"],
      ["MB are 10^6 bytes, GB 10^9, by `inspect`'s formulas; \"x of limit\" = time / "
       "((param + cache bytes) / limit); the limit is the dense matmul's rate "
       "at this batch and dtype. Below 1x the step beat the plain matmul: "
       "a CPU without native bfloat16 dots emulates the matmul's, so compare "
       "float32 there; at large batches the matmul is bound by compute, not "
       "by bytes."])
  lim_rows = [["copy (a * 2 over a large float32 array, read + write)",
               f"{out['copy_bytes_per_s'] / 1e9:.1f}"]]
  for (dtype, batch), rate in sorted(out["limits"].items()):
    name = "matrix-vector product" if batch == 1 else "dense matmul"
    lim_rows.append([f"{name} [{batch}, d] x [d, f], {dtype}",
                     f"{rate / 1e9:.1f}"])
  limit_table = Table("This machine's streaming rates", ["what", "GB/s"],
                      lim_rows, ["absolute"])
  return [time_table, byte_table, limit_table, _host_table(out["host"])]


def _host_table(cells: list[dict]) -> Table:
  labels = [label for label, _ in HOST_VARIANTS]
  rows = []
  for c in cells:
    moved = [kb(c["bytes"][label]["host"]["moved_to_device_bytes"]
                + c["bytes"][label]["host"]["moved_to_host_bytes"])
             for label in labels[1:]]
    if "skipped" in c:
      rows.append([str(c["batch"]), f"skipped: {c['skipped']}"] + [""] * 6 + moved)
      continue
    t = c["timing"]
    dev = t["device"].median
    row = [str(c["batch"])]
    for label in labels:
      row += [ms(t[label].median), pct(t[label].spread)]
    row += [f"{t[label].median / dev:.2f}x" for label in labels[1:]]
    rows.append(row + moved)
  header = ["batch"]
  for label in labels:
    header += [f"{label} ms", f"{label} spread"]
  header += [f"{label} / device" for label in labels[1:]]
  header += [f"{label}: moved kB" for label in labels[1:]]
  kinds = ["absolute", "", "absolute", "", "absolute", "", "ratio", "ratio",
           "", ""]
  return Table(
      "Host tables: UltraMemV2, float32", header, rows, kinds,
      ["device: tables in device memory; host rows / host sum: "
       "`model.memory.table_memory=host` with `host_read=rows` or `sum`. "
       "moved kB (10^3 bytes): bytes crossing between host and device per step, both "
       "ways, by `inspect` (`decode_cost.host_transfer_bytes`). On a CPU "
       "the two memories are one: the ratios are the mechanism's overhead."])


def run(quick: bool = False) -> Result:
  out = _measure(quick)
  context = out["context"]
  setup = [f"models: {', '.join(f'{n} `{p}`' for n, p in MODELS)}"
           + (" shrunk by `--quick` (" + " ".join(QUICK) + ")" if quick else ""),
           f"{context} cached tokens; batches {', '.join(str(c) for c in (QUICK_BATCHES if quick else BATCHES))}; "
           f"dtypes {', '.join(QUICK_DTYPES if quick else DTYPES)} "
           "(`model.dtype`; parameters float32)"]
  out["nothing_measured"] = not any("timing" in c for c in out["cells"])
  return Result("decode", DESCRIPTION, setup, _tables(out), data=out)
