"""Parameter and FLOP counts of a config, from ``jax.eval_shape`` (nothing is
allocated, so a 7B config answers in seconds), and what its collectives cost
on the config's mesh.

    python -m ultramem_jax.inspect configs/tiny_dense.yaml [key=value ...]
        [--devices N] [--batch 1,8,64] [--table]
        [--memory [--device_memory GiB | --chip NAME]]

prints one JSON object (``--table``: a table of the collectives instead;
``--memory``: the per-device memory of one train step against the device's
memory, ``training/memory_estimate.py``, with the chips of its table by
name, e.g. ``--chip v5p``).
``mesh.*`` overrides choose the mesh (``mesh.data=2 mesh.memory=4``); the
axis set to -1 (``mesh.data`` by default) takes the devices the others
leave of ``--devices N``, which defaults to the devices JAX sees here (as
``train.py`` would); with no -1 axis the mesh is the sizes given and N
defaults to their product. The conventions:

- ``embedding_params``: the token-embedding matrix, plus the output matrix
  when it is not tied.
- ``non_embedding_params``: everything else (what the paper's tables call
  "total" parameters).
- ``activated_non_embedding_params``: non-embedding parameters a token
  touches; FFN kinds that touch only part of their weights (MoE, memory
  layers) say how much through an ``activated_param_count()`` method.
- ``activated_params``: parameters touched per token: the activated
  non-embedding ones, the whole output matrix (every logit is computed) and,
  when untied, one row of the input embedding. With tied embeddings this is
  the paper's "active" count at 227M (non-embedding + one vocab x d matrix).
- ``flops_per_token``: forward FLOPs, 2 per multiply-add: every activated
  weight matrix once, the output matrix, and attention scores and values
  over a full context of ``data.seq_len`` (4 * L * seq_len * heads * head_dim;
  no causal halving). FFN kinds may refine their part with
  ``flops_per_token()``. ``train_flops_per_token``: 3x that (forward and
  backward), what the train loop's TFLOP/s and MFU count. The formula is
  ``model/flops.py``'s.
- ``decode``: for each batch size B of ``--batch``, the bytes one decode
  step reads from parameters (experts touched ``min(B*k, E)``, value rows
  ``min(B*m, N)``, all keys and dense weights; spec section 7) and the KV
  cache at context ``data.seq_len``; formulas in ``decode_cost.py``. With
  ``model.memory.table_memory=host``, also what the step reads from device
  memory and moves between host and device (``host``).
- ``collectives``: per layer, each collective's bytes per token forward and
  backward (bytes one device sends / tokens it processes), and per step the
  parameter all-gathers and gradient reductions (bytes one device sends);
  formulas and what is approximate in ``parallel/collective_cost.py``.
"""

from __future__ import annotations

import json
import math
import sys

import jax
from flax import nnx

from ultramem_jax.config import ConfigError
from ultramem_jax.decode_cost import Param, decode_report
from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model.abstract import abstract_model, resolved_vocab
from ultramem_jax.model.flops import config_flops, token_flops
from ultramem_jax.model.transformer import Transformer
from ultramem_jax.parallel import collective_cost as CC
from ultramem_jax.parallel.mesh import check_mesh
from ultramem_jax.training.config import Config, load_config
from ultramem_jax.training.memory_estimate import (CHIPS, GIB,
                                                   estimate_train_memory,
                                                   memory_table)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def param_infos(model: Transformer) -> list[CC.ParamInfo]:
  """Every parameter's path, size, element bytes and logical axis names."""
  out = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    out.append(CC.ParamInfo("/".join(map(str, path)), math.prod(var.shape),
                            var.dtype.itemsize, tuple(names)))
  return out


def decode_params(model: Transformer) -> list[Param]:
  return [Param("/".join(map(str, path)), tuple(var.shape), var.dtype.itemsize)
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def inspect_config(cfg: Config, devices: int | None = None,
                   batches: tuple[int, ...] = (1, 8, 64)) -> dict:
  """Counts of `cfg` and its collectives on the mesh over `devices`
  (see ``parallel/mesh.mesh_sizes``). Raises ConfigError for a mesh that
  cannot be built or that does not divide a sharded dimension."""
  model = abstract_model(cfg, unrolled=True)
  sizes = check_mesh(cfg, model, devices, batch=False)
  m = cfg.model
  vocab, d = resolved_vocab(cfg), m.d_model
  params = nnx.state(model, nnx.Param)
  total = _count(params)
  embedding = vocab * d * (1 if m.tie_embeddings else 2)

  # A scanned model's blocks are stacked: count on the unrolled one.
  flops = (config_flops(cfg) if getattr(m, "scan_layers", False)
           else token_flops(model, cfg))
  activated_non_embedding = flops.activated_non_embedding_params
  return {
      "total_params": total,
      "embedding_params": embedding,
      "non_embedding_params": total - embedding,
      "activated_non_embedding_params": activated_non_embedding,
      "activated_params": activated_non_embedding + vocab * d
                          + (0 if m.tie_embeddings else d),
      "flops_per_token": flops.forward,
      "attention_flops_per_token": flops.attention,
      "train_flops_per_token": flops.train,
      "vocab_size": vocab,
      "d_model": d,
      "n_layers": m.n_layers,
      "seq_len": cfg.data.seq_len,
      "ffn_kind": m.ffn.kind,
      **_memory_summary(model, cfg),
      "decode": decode_report(cfg, decode_params(model), batches),
      "collectives": CC.collective_report(cfg, sizes, param_infos(model)),
  }


def _memory_summary(model: Transformer, cfg: Config) -> dict:
  """Sizes of the memory layers, if any (``memory`` key)."""
  geo = memory_geometry(cfg.model)
  if not geo.placement:
    return {}
  mem = cfg.model.memory
  tables = [b.memory.table for b in model.blocks
            if b.memory is not None and b.memory.table is not None]
  if model.memory_table is not None:
    tables.append(model.memory_table)
  table_params = sum(_count(nnx.state(t, nnx.Param)) for t in tables)
  return {"memory": {
      "layers": [f"{s}:{t}" if s != t else str(s) for s, t in geo.placement],
      "keys_per_side": geo.keys_per_side,
      "value_blocks": geo.blocks,
      "table_rows": geo.table_rows,
      "tables": len(tables),
      "table_params": table_params,
      "rows_read_per_token_per_layer": mem.heads * mem.top_m,
      "value_dim": cfg.model.value_dim,
      "pre_value_dim": mem.pre_value_dim,
  }}


def _bytes(x: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {unit}"
  return f"{x:.4g} B"


def collectives_table(c: dict) -> str:
  """The ``collectives`` section as text: one row per op of each layer
  group (bytes per token), then the per-step rows (bytes per device)."""
  mesh = " ".join(f"{a}={n}" for a, n in c["mesh"].items())
  lines = [f"mesh {mesh}; {c['tokens_per_step']} tokens per step, "
           f"{c['tokens_per_device']} per device", "",
           f"{'layers':<24} {'op (bwd op)':<28} {'group':>9} {'fwd B/tok':>10} "
           f"{'bwd B/tok':>10}  what"]
  for e in c["per_layer"]:
    ls = e["layers"]
    where = (f"{e['kind']} x{len(ls)}" if len(ls) > 1 else
             e["kind"] if isinstance(ls[0], str) else f"{e['kind']} {ls[0]}")
    for o in e["ops"]:
      op = o["op"] + (f" ({o['op_bwd']})" if o["op_bwd"] not in (None, o["op"]) else "")
      mark = "~" if o.get("approximate") else ""
      lines.append(f"{where[:24]:<24} {op:<28} {o['axis'] + ':' + str(o['group']):>9} "
                   f"{o['bytes_per_token_fwd']:>10} {o['bytes_per_token_bwd']:>10}"
                   f"  {mark}{o['what']}")
  t = c["per_token"]
  lines += [f"{'all layers':<24} {'':<28} {'':>9} {t['fwd']:>10} {t['bwd']:>10}"
            f"  = {t['total']} bytes per token", "",
            f"{'per step':<24} {'op':<28} {'group':>9} {'B/device':>10}  what"]
  for e in c["per_step"]:
    lines.append(f"{'':<24} {e['op']:<28} {e['group']:>9} "
                 f"{_bytes(e['bytes_per_device']):>10}  {e['what']} "
                 f"over {'*'.join(e['axes'])}")
  s = c["per_device_per_step"]
  lines += ["", f"per device per step: activations {_bytes(s['activations'])}, "
            f"parameters and counters {_bytes(s['parameters_and_counters'])}, "
            f"total {_bytes(s['total'])}; ~: approximate, per step: all approximate"]
  return "\n".join(lines)


def memory_report(cfg: Config, devices: int | None,
                  device_gib: float | None) -> str:
  """``--memory``: the estimate's table for `cfg` on the mesh over
  `devices` against `device_gib` GiB per device (None: unknown)."""
  model = abstract_model(cfg)
  check_mesh(cfg, model, devices)
  return memory_table(estimate_train_memory(
      cfg, model, devices, device_gib * GIB if device_gib else None))


def _device_gib(flag: str, value: str) -> float | str:
  """GiB per device from --device_memory GiB or --chip NAME, or an error."""
  if flag == "--chip":
    if value.lower() not in CHIPS:
      return f"--chip: got {value!r}; known chips: {', '.join(CHIPS)}"
    return CHIPS[value.lower()]
  try:
    gib = float(value)
  except ValueError:
    gib = 0.0
  return gib if gib > 0 else (f"--device_memory: expected a positive number "
                              f"of GiB, got {value!r}")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0 if argv else 2
  devices, table, rest, batches = None, False, [], (1, 8, 64)
  memory, device_gib = False, None
  it = iter(argv)
  for arg in it:
    if arg == "--table":
      table = True
    elif arg == "--memory":
      memory = True
    elif arg.split("=", 1)[0] in ("--chip", "--device_memory"):
      flag = arg.split("=", 1)[0]
      value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
      device_gib = _device_gib(flag, value)
      if isinstance(device_gib, str):
        print(f"error: {device_gib}", file=sys.stderr)
        return 2
    elif arg == "--devices" or arg.startswith("--devices="):
      value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
      if not value.isdigit() or int(value) < 1:
        print(f"error: --devices: expected a positive integer, got {value!r}",
              file=sys.stderr)
        return 2
      devices = int(value)
    elif arg == "--batch" or arg.startswith("--batch="):
      value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
      parts = value.split(",")
      if not all(x.isdigit() and int(x) > 0 for x in parts):
        print(f"error: --batch: expected positive integers separated by commas, "
              f"got {value!r}", file=sys.stderr)
        return 2
      batches = tuple(int(x) for x in parts)
    else:
      rest.append(arg)
  if not rest:
    print("error: no config file given", file=sys.stderr)
    return 2
  try:
    cfg = load_config(rest[0], rest[1:])
    if memory:
      print(memory_report(cfg, devices, device_gib))
      return 0
    out = inspect_config(cfg, devices, batches)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(collectives_table(out["collectives"]) if table else json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
