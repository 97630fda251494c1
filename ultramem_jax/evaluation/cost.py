"""eval.py cost: what a decode step reads, by formula and by XLA.

For each config and batch size B it prints the formula of spec section 7
(``ultramem_jax/decode_cost.py``: experts touched ``min(B*k, E)``, value rows
``min(B*m, N)``, every key and dense weight, plus the KV cache at context
``data.seq_len``) beside ``cost_analysis()`` of the compiled decode step:
``Transformer.extend`` of one token per row with a cache of
``data.seq_len`` slots (attention reads every slot, masked; its cost does
not depend on how many are filled), what ``eval.py generate`` runs per
token. Nothing is allocated: the step is lowered from abstract shapes
(``nnx.eval_shape``), so the paper's configs compile on a laptop; the XLA
numbers are those of the backend it runs on (CPU here).

XLA's "bytes accessed" sums, over every op of the optimised program, the
bytes of its operands and results. It therefore also counts activations,
the logits and, on CPU, copies of the KV cache made for layout, which the
formula (parameters + KV cache) leaves out. And on CPU a gather fused with
other work is counted as reading its whole operand: for the MoE's stacked
experts and the memory tables XLA's number is all their bytes, not the rows
the step reads (measured: tiny_moe and tiny_ultramem_v2 at B = 1 come to
1.26 and 1.12 times all parameter bytes, against 1.16 for tiny_dense).
So on CPU the XLA column checks the dense part and the FLOPs; the sparse
reads are the formula's, which the layers' gathers implement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.config import ConfigError, require_writable_dir
from ultramem_jax.decode_cost import decode_report
from ultramem_jax.inspect import decode_params, inspect_config
from ultramem_jax.model.abstract import abstract_model, resolved_vocab
from ultramem_jax.model.kv_cache import KVCache
from ultramem_jax.model.transformer import Transformer
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config


def add_parser(sub) -> None:
  p = sub.add_parser("cost", help="bytes and FLOPs of a decode step: formula "
                     "and XLA's cost analysis")
  p.add_argument("--config", action="append", required=True,
                 help="a config YAML (repeat for several)")
  p.add_argument("--batch", default="1,8,64",
                 help="batch sizes, comma-separated (default 1,8,64)")
  p.add_argument("--no_xla", action="store_true",
                 help="formula only (no compilation)")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="also write the table as JSON and markdown here (a "
                      "path without suffix)")
  p.add_argument("overrides", nargs="*", help="dotted.key=value, for every config")


def xla_decode_cost(cfg, batch: int) -> dict:
  """flops and bytes accessed of the compiled decode step of `cfg` for
  `batch` rows at context ``data.seq_len`` (single device)."""
  model_cfg = dataclasses.replace(cfg.model, vocab_size=resolved_vocab(cfg))
  context = cfg.data.seq_len
  with use_mesh(single_device_mesh()):
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    cache = jax.eval_shape(lambda: KVCache.create(model_cfg, batch, context))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)

    def decode(params, cache, tokens):
      logits, cache = nnx.merge(graphdef, params).extend(tokens, cache)
      return logits, cache

    compiled = jax.jit(decode, donate_argnums=1).lower(params, cache, tokens).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {"xla_flops": float(cost.get("flops", 0.0)),
          "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def cost_table(cfg, batches: tuple[int, ...], xla: bool = True) -> list[dict]:

  counts = inspect_config(cfg, 1, batches)
  rows = []
  for r in decode_report(cfg, decode_params(abstract_model(cfg, unrolled=True)), batches):
    row = {"batch": r["batch"], "context": r["context"],
           "param_bytes": r["param_bytes"], "kv_cache_bytes": r["kv_cache_bytes"],
           "formula_bytes": r["param_bytes"] + r["kv_cache_bytes"],
           "formula_flops": counts["flops_per_token"] * r["batch"],
           "experts_read": r["experts_read"],
           "memory_rows_read": r["memory_rows_read"]}
    if xla:
      row.update(xla_decode_cost(cfg, r["batch"]))
      row["xla_over_formula_bytes"] = row["xla_bytes_accessed"] / row["formula_bytes"]
      row["xla_over_formula_flops"] = row["xla_flops"] / row["formula_flops"]
    rows.append(row)
  return rows


def _gb(x: float) -> str:
  return f"{x / 1e9:,.3f}"


def markdown(results: dict[str, list[dict]]) -> str:
  xla = any("xla_flops" in r for rows in results.values() for r in rows)
  head = ("| config | B | params read (GB) | KV cache (GB) | formula (GB) |"
          + (" XLA bytes (GB) | XLA / formula |" if xla else "")
          + " formula GFLOP |" + (" XLA GFLOP |" if xla else "")
          + " params read per token (MB) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for name, rows in results.items():
    for r in rows:
      cells = [name, str(r["batch"]), _gb(r["param_bytes"]), _gb(r["kv_cache_bytes"]),
               _gb(r["formula_bytes"])]
      if xla:
        cells += [_gb(r["xla_bytes_accessed"]), f"{r['xla_over_formula_bytes']:.2f}"]
      cells.append(f"{r['formula_flops'] / 1e9:,.3f}")
      if xla:
        cells.append(f"{r['xla_flops'] / 1e9:,.3f}")
      cells.append(f"{r['param_bytes'] / r['batch'] / 1e6:,.2f}")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:

  parts = args.batch.split(",")
  if not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ConfigError(f"--batch: expected positive integers separated by commas, "
                      f"got {args.batch!r}")
  batches = tuple(int(p) for p in parts)
  if args.out is not None:  # before anything is compiled
    require_writable_dir(args.out.parent, "--out")
  configs = {path: load_config(path, args.overrides) for path in args.config}
  results = {}
  for path, cfg in configs.items():
    print(f"{path}: compiling the decode step ..." if not args.no_xla else path,
          file=sys.stderr, flush=True)
    results[pathlib.Path(path).stem] = cost_table(cfg, batches, not args.no_xla)
  table = markdown(results)
  print(table)
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table)
  return 0
