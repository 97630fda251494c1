"""What each collective of a training step costs, from the config and the
mesh sizes alone (no devices, nothing compiled): the numbers behind the
``collectives`` section of ``python -m ultramem_jax.inspect``.

**Bytes per token.** For a collective that moves activations:

    bytes per token = bytes one device sends in it / tokens that device processes

where a device processes T / (data * fsdp * expert * memory) of the T =
batch_size * seq_len tokens of a step (``BATCH_AXES``). Without tensor
parallelism this equals the bytes sent by all devices together divided by T;
tensor peers process the same tokens, and each pays its own. The time a
collective takes is about (bytes per token * tokens per device) / (the
bandwidth of one device's links). **Per step** (parameters, gradients,
counters): the bytes one device sends in one optimizer step.

A collective over a group of m devices, on per-device buffers, costs what
bandwidth-optimal (ring) schedules send, per device:

    all-gather, result R bytes          (m - 1) / m * R
    reduce-scatter, operand R bytes     (m - 1) / m * R
    all-reduce of R bytes               2 (m - 1) / m * R
    all-to-all of R bytes               (m - 1) / m * R   (1/m stays local)

and nothing when m = 1. Gathering b bytes of each of a device's tokens over
a group of m (the gathered buffer holds m tokens per token of the device) is
therefore (m - 1) * b per token; an all-reduce of b bytes per token of the
gathered group 2 (m - 1) * b.

**Memory layer** (spec section 2 step 6, section 5;
``memory_sharding.sharded_read``), group of M devices on the ``memory`` axis,
per token: S = heads * top_m kept slots, hc weights per slot (Tucker cores,
1 for ``score: sum``), E value blocks, Dv value width, Dp pre-value width,
b the compute dtype's bytes, f = 4 (float32 scores and partial outputs; 8
under float64):

    all-gather slots          (M-1) * 4 S            (int32; no gradient)
    all-gather blocks         (M-1) * 4 S            (only E > 1: with E = 1 the
                                                      read never uses them)
    all-gather scores         (M-1) * f S hc         backward: reduce-scatter, same
    all-gather z              (M-1) * b Dp           (Dp > 0) backward: reduce-scatter
    all-reduce a = <z, P[p]>  2 (M-1) * f S          (Dp > 0) backward: all-reduce
    column: all-to-all o      (M-1)/M * f E Dv       backward: all-to-all
    row: reduce-scatter o     (M-1) * f E Dv         backward: all-gather

**MoE layer** over the ``expert`` axis (X devices; the expert-parallel
path of ``model/moe.py``: dropless routing, ``ragged_all_to_all``; not
checked against a compile here, and ``capacity_factor > 0`` is not
modelled), k assignments of d values (compute dtype) per token;
under uniform routing (X - 1)/X of them leave the device, and the outputs
come back the same way:

    dispatch + combine        2 k d b (X-1)/X        backward: the same again

plus, per layer and step, an all-gather of the per-expert counts [E] int32
over ``expert`` ((X - 1) * 4 E bytes per device) and an all-reduce over the
batch axes of the router statistics of the load-balance loss ([E] int32
counts, [E] float32 mean probabilities). These are the ragged costs: on
CPU, where ``parallel/expert_sharding.py`` emulates ``ragged_all_to_all``
with a dense all-to-all from worst-case buffers, the dispatch moves X times
and the combine (sent from the X*k*N-row receive buffer) X^2 times as many
bytes. The experts are read inside ``shard_map`` split over ``expert`` only,
so their ``fsdp`` and ``tensor`` shards are all-gathered first.

**Tensor axis** (``tensor`` = T, Megatron style, *approximate*): per block
an all-reduce of the [tokens, d] output of the row-parallel attention output
and dense FFN (or shared experts') down projections, 2 (T-1)/T * b d per
token each; backward one per
column-parallel input (a lower bound: the CPU compile all-reduces the q, k,
v and the gate, up input gradients separately, 5 per block). The vocabulary
sharded over T adds an all-reduce of the looked-up embedding and of the
cross-entropy's max and sum-exp (forward), and of the hidden state's
gradient (backward).

**Per step** (approximate, from the rules table ``rules.LOGICAL_AXIS_RULES``
and the ideal schedule): a parameter sharded over batch axes that its layer
does not read in place (``fsdp``; ``memory`` for the memory layer's w_p, w_g,
w_o) is all-gathered before use and its gradient reduce-scattered back;
every gradient is all-reduced over the batch axes its parameter is
replicated on (the tables, read in place inside ``shard_map``, over every
batch axis but ``memory``; experts, read in place by the expert-parallel
path, over every batch axis but ``expert``). The memory layers' slot-use
stamps ([rows] int32 each) are all-reduced (max) over the batch axes.
Scalars (loss, metrics) are left out. XLA may choose costlier schedules
(the CPU compile all-reduces the full gradient of w_p and w_o over all batch
devices, 1.75x the ideal at data=2, memory=4); forward all-gathers are
counted once (no rematerialisation).

The formulas count the program's dtypes; XLA's CPU compile widens bfloat16
collectives to float32. A batch the batch axes do not divide is padded
(``sharded_read``), which the per-token numbers leave out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.parallel.rules import BATCH_AXES, RULES, batch_shards

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}
INT32 = 4


# --------------------------------------------------------------------------
# The primitives: bytes one device sends, per-device buffer sizes in bytes
# --------------------------------------------------------------------------


def all_gather(result: float, m: int) -> float:
  """(m - 1) / m * R for a gathered result of R bytes."""
  return (m - 1) / m * result


def reduce_scatter(operand: float, m: int) -> float:
  """(m - 1) / m * R for an operand of R bytes (result R / m)."""
  return (m - 1) / m * operand


def all_reduce(size: float, m: int) -> float:
  """2 (m - 1) / m * R: a reduce-scatter, then an all-gather."""
  return 2 * (m - 1) / m * size


def all_to_all(size: float, m: int) -> float:
  """(m - 1) / m * R: every device keeps 1/m of its R bytes."""
  return (m - 1) / m * size


@dataclasses.dataclass(frozen=True)
class Op:
  """One collective of a layer, in bytes per token (forward, backward);
  `bwd_op` is the backward's collective (its transpose) when it differs."""

  op: str
  what: str
  axis: str
  group: int
  fwd: float
  bwd: float
  bwd_op: str = ""
  approximate: bool = False

  @property
  def backward_op(self) -> str | None:
    return (self.bwd_op or self.op) if self.bwd else None

  def as_dict(self) -> dict:
    out = {"op": self.op, "what": self.what, "axis": self.axis,
           "group": self.group, "bytes_per_token_fwd": _round(self.fwd),
           "bytes_per_token_bwd": _round(self.bwd), "op_bwd": self.backward_op}
    if self.approximate:
      out["approximate"] = True
    return out


def _round(x: float) -> float | int:
  return int(x) if float(x).is_integer() else round(x, 3)


# --------------------------------------------------------------------------
# Per-token collectives of one layer
# --------------------------------------------------------------------------


def memory_layer_ops(*, group: int, slots: int, cores: int, blocks: int,
                     value_dim: int, pre_value_dim: int, dtype_bytes: int,
                     mode: str = "column") -> list[Op]:
  """The collectives of one memory layer over a group of M = `group`
  devices (module docstring); `slots` S = heads * top_m, `cores` hc,
  `blocks` E. Empty for M = 1."""
  m, s, hc, e = group, slots, cores, blocks
  if m == 1:
    return []
  f, b, ax = max(4, dtype_bytes), dtype_bytes, "memory"
  gather = lambda per_token: all_gather(m * per_token, m)   # (m-1) * per_token
  ops = [Op("all-gather", "slots [N, S] int32", ax, m, gather(INT32 * s), 0)]
  if e > 1:
    ops.append(Op("all-gather", "value blocks [N, S] int32", ax, m,
                  gather(INT32 * s), 0))
  g = gather(f * s * hc)
  ops.append(Op("all-gather", "scores [N, S, hc]", ax, m, g, g, "reduce-scatter"))
  if pre_value_dim:
    g = gather(b * pre_value_dim)
    ops.append(Op("all-gather", "z [N, Dp]", ax, m, g, g, "reduce-scatter"))
    r = all_reduce(m * f * s, m)
    ops.append(Op("all-reduce", "pre-value dots a [N, S] float32", ax, m, r, r))
  if mode == "column":
    a = all_to_all(f * e * value_dim, m)
    ops.append(Op("all-to-all", "outputs [N, E, Dv/M] float32", ax, m, a, a))
  elif mode == "row":
    r = reduce_scatter(m * f * e * value_dim, m)
    ops.append(Op("reduce-scatter", "partial outputs [N, E*Dv] float32",
                  ax, m, r, r, "all-gather"))
  else:
    raise ValueError(f"table sharding {mode!r}: expected column or row")
  return ops


def moe_layer_ops(*, group: int, top_k: int, d_model: int,
                  dtype_bytes: int) -> list[Op]:
  """Dispatch and combine of one MoE layer over X = `group` expert devices:
  k d b (X-1)/X per token each way, the same again backward."""
  x = group
  if x == 1:
    return []
  a = all_to_all(top_k * d_model * dtype_bytes, x)
  return [Op("ragged-all-to-all", "dispatch k tokens [N*k, d]", "expert", x, a, a),
          Op("ragged-all-to-all", "combine k outputs [N*k, d]", "expert", x, a, a)]


def tensor_ops(*, group: int, d_model: int, dtype_bytes: int, part: str,
               backward_inputs: int = 1) -> list[Op]:
  """Megatron-style all-reduce of a [N, d] partial sum over T = `group`
  tensor devices: the output of `part` (forward), and its input gradient
  (backward, `backward_inputs` of them; 0 for none)."""
  t = group
  if t == 1:
    return []
  r = all_reduce(d_model * dtype_bytes, t)
  return [Op("all-reduce", f"{part} [N, d]", "tensor", t, r,
             backward_inputs * r, approximate=True)]


def head_ops(*, group: int, d_model: int, dtype_bytes: int) -> list[Op]:
  """Vocabulary sharded over T: the embedding lookup's partial rows, the
  cross-entropy's max and sum-exp (float32), the hidden gradient."""
  t = group
  if t == 1:
    return []
  emb = all_reduce(d_model * dtype_bytes, t)
  return [Op("all-reduce", "embedding lookup [N, d]", "tensor", t, emb, 0,
             approximate=True),
          Op("all-reduce", "logit max, sum-exp [N] float32 (bwd: hidden "
             "gradient [N, d])", "tensor", t, all_reduce(2 * 4, t), emb,
             approximate=True)]


# --------------------------------------------------------------------------
# Per-step collectives of parameters and gradients
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """One parameter: slash-joined path, element count, bytes per element,
  logical axis names (``rules.LOGICAL_AXIS_RULES``)."""

  path: str
  size: int
  itemsize: int
  names: tuple[str | None, ...]


def param_category(p: ParamInfo) -> tuple[str, frozenset[str]]:
  """(category, mesh axes its layer reads it split over, ungathered): the
  tables inside the memory layer's shard_map, the experts inside the
  expert-parallel shard_map, anything else tensor-parallel."""
  leaf = p.path.rsplit("/", 1)[-1]
  if leaf in ("values", "pre_values"):
    return "memory tables", frozenset({"memory"})
  if "expert" in p.names:
    return "MoE experts", frozenset({"expert"})
  return "other parameters", frozenset({"tensor"})


def mesh_axes(names: Sequence[str | None]) -> list[str]:
  """Mesh axes sharding some dimension of an array with these names."""
  axes = []
  for name in names:
    rule = RULES.get(name) if name is not None else None
    if rule is not None:
      axes += [rule] if isinstance(rule, str) else list(rule)
  return axes


def param_step_ops(params: Iterable[ParamInfo], sizes: dict[str, int]) -> list[dict]:
  """Per-step parameter all-gathers, gradient reduce-scatters and gradient
  all-reduces (module docstring), summed by (op, axes, category); bytes are
  what one device sends per step."""
  batch = [a for a in BATCH_AXES if sizes.get(a, 1) > 1]
  rows: dict[tuple, list[float]] = {}

  def add(op, what, axes, category, param_bytes, sent):
    group = math.prod(sizes[a] for a in axes)
    key = (op, what, tuple(axes), group, category)
    acc = rows.setdefault(key, [0.0, 0.0])
    acc[0] += param_bytes
    acc[1] += sent

  for p in params:
    category, in_place = param_category(p)
    full = p.size * p.itemsize
    sharded = [a for a in mesh_axes(p.names) if sizes.get(a, 1) > 1]
    kept = [a for a in sharded if a in in_place]
    gathered = [a for a in sharded if a not in kept]
    used = full / math.prod(sizes[a] for a in kept)    # bytes after the gather
    if gathered:
      a = math.prod(sizes[x] for x in gathered)
      add("all-gather", "parameters before use", gathered, category, full,
          all_gather(used, a))
      add("reduce-scatter", "gradients", gathered, category, full,
          reduce_scatter(used, a))
    replicated = [x for x in batch if x not in sharded]
    if replicated:
      r = math.prod(sizes[x] for x in replicated)
      shard = full / math.prod(sizes[x] for x in sharded)
      add("all-reduce", "gradients", replicated, category, full,
          all_reduce(shard, r))
  return [{"op": op, "what": f"{what}: {category}", "axes": list(axes),
           "group": group, "param_bytes": _round(pb),
           "bytes_per_device": _round(sent), "approximate": True}
          for (op, what, axes, group, category), (pb, sent) in sorted(rows.items())]


def counter_step_ops(*, memory_rows: Sequence[int], moe_experts: Sequence[int],
                     sizes: dict[str, int]) -> list[dict]:
  """Per step: all-reduce (max) of each memory layer's slot-use stamps
  [rows] int32 over the batch axes; per MoE layer, all-gather of the per-
  expert counts [E] int32 over ``expert`` and all-reduce of the router
  statistics ([E] int32 counts, [E] float32 mean probabilities) over the
  batch axes."""
  out = []
  batch = [a for a in BATCH_AXES if sizes.get(a, 1) > 1]
  g = math.prod(sizes[a] for a in batch)
  if memory_rows and g > 1:
    out.append({"op": "all-reduce", "what": "memory slot-use stamps [rows] int32 "
                f"(max), {len(memory_rows)} layers", "axes": batch, "group": g,
                "bytes_per_device": _round(sum(all_reduce(INT32 * r, g)
                                               for r in memory_rows))})
  if moe_experts and g > 1:
    out.append({"op": "all-reduce", "what": "router statistics [E] int32 + [E] "
                f"float32, {len(moe_experts)} layers", "axes": batch, "group": g,
                "bytes_per_device": _round(sum(all_reduce(8 * e, g)
                                               for e in moe_experts))})
  x = sizes.get("expert", 1)
  if moe_experts and x > 1:
    out.append({"op": "all-gather", "what": "per-expert counts [E] int32, "
                f"{len(moe_experts)} layers", "axes": ["expert"], "group": x,
                "bytes_per_device": _round(sum(all_gather(x * INT32 * e, x)
                                               for e in moe_experts))})
  return out


# --------------------------------------------------------------------------
# The report of a config
# --------------------------------------------------------------------------


def _group_layers(entries: list[tuple[int | str, str, list[Op]]]) -> list[dict]:
  """Blocks with the same kind and ops share one entry (``layers`` lists them)."""
  groups: dict[tuple, list[int]] = {}
  for block, kind, ops in entries:
    if ops:
      groups.setdefault((kind, tuple(ops)), []).append(block)
  out = []
  for (kind, ops), blocks in groups.items():
    fwd, bwd = sum(o.fwd for o in ops), sum(o.bwd for o in ops)
    out.append({"kind": kind, "layers": blocks, "ops": [o.as_dict() for o in ops],
                "bytes_per_token_fwd": _round(fwd),
                "bytes_per_token_bwd": _round(bwd),
                "total_bytes_per_token": _round(fwd + bwd)})
  return out


def collective_report(cfg, sizes: dict[str, int], params: Iterable[ParamInfo]) -> dict:
  """The ``collectives`` section of ``inspect`` for a ``Config`` and the
  resolved mesh `sizes` (axis -> devices)."""
  m_cfg, mem = cfg.model, cfg.model.memory
  b = DTYPE_BYTES[m_cfg.dtype]
  d = m_cfg.d_model
  t, x, mm = sizes.get("tensor", 1), sizes.get("expert", 1), sizes.get("memory", 1)
  geo = memory_geometry(m_cfg)
  memory_blocks = {src for src, _ in geo.placement}
  moe = m_cfg.ffn.kind == "moe"
  hc = mem.tucker_cores if mem.score == "tucker" else 1

  entries, moe_layers = [], 0
  entries.append(("embedding/output", "vocab (tensor)",
                  head_ops(group=t, d_model=d, dtype_bytes=b)))
  for i in range(m_cfg.n_layers):
    entries.append((i, "attention (tensor)", tensor_ops(
        group=t, d_model=d, dtype_bytes=b, part="attention output",
        backward_inputs=1)))
    has_ffn = not (i in memory_blocks and mem.replace_ffn)
    if has_ffn and moe:
      moe_layers += 1
      entries.append((i, "moe", moe_layer_ops(
          group=x, top_k=m_cfg.ffn.moe.top_k, d_model=d, dtype_bytes=b)))
    if has_ffn and (not moe or m_cfg.ffn.moe.num_shared_experts):
      entries.append((i, "ffn (tensor)", tensor_ops(
          group=t, d_model=d, dtype_bytes=b, backward_inputs=1,
          part="shared experts' output" if moe else "FFN output")))
    if i in memory_blocks:
      entries.append((i, "memory", memory_layer_ops(
          group=mm, slots=mem.heads * mem.top_m, cores=hc, blocks=geo.blocks,
          value_dim=m_cfg.value_dim, pre_value_dim=mem.pre_value_dim,
          dtype_bytes=b, mode=mem.table_sharding)))
  per_layer = _group_layers(entries)
  fwd = sum(e["bytes_per_token_fwd"] * len(e["layers"]) for e in per_layer)
  bwd = sum(e["bytes_per_token_bwd"] * len(e["layers"]) for e in per_layer)

  tokens = cfg.data.batch_size * cfg.data.seq_len
  shards = batch_shards(sizes)
  per_device = tokens / shards
  per_step = param_step_ops(params, sizes) + counter_step_ops(
      memory_rows=[geo.rows_per_block] * len(geo.placement),
      moe_experts=[m_cfg.ffn.moe.num_experts] * moe_layers, sizes=sizes)
  step_params = sum(e["bytes_per_device"] for e in per_step)
  return {
      "mesh": dict(sizes),
      "definition": "bytes_per_token: bytes one device sends / tokens it "
                    "processes (ring schedules); per step: bytes one device "
                    "sends per optimizer step",
      "tokens_per_step": tokens,
      "tokens_per_device": _round(per_device),
      "per_layer": per_layer,
      "per_token": {"fwd": _round(fwd), "bwd": _round(bwd),
                    "total": _round(fwd + bwd)},
      "per_step": per_step,
      "per_device_per_step": {
          "activations": _round((fwd + bwd) * per_device),
          "parameters_and_counters": _round(step_params),
          "total": _round((fwd + bwd) * per_device + step_params)},
  }
