"""What each collective of a training step costs, from the config and the
mesh sizes alone (no devices, nothing compiled): the numbers behind the
``collectives`` section of ``python -m ultramem_jax.inspect``. The
per-token collectives of a layer are in :mod:`.collective_ops`, the
per-step ones of parameters and counters in :mod:`.collective_step`; this
module adds them up over a config's layers.

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

from typing import Iterable

from ultramem_jax.memory_geometry import MemoryGeometry, memory_geometry
from ultramem_jax.parallel.collective_ops import (
    Op, head_ops, memory_layer_ops, moe_layer_ops, round_bytes, tensor_ops)
from ultramem_jax.parallel.collective_step import (
    ParamInfo, counter_step_ops, param_step_ops)
from ultramem_jax.parallel.rules import batch_shards

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}


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
                "bytes_per_token_fwd": round_bytes(fwd),
                "bytes_per_token_bwd": round_bytes(bwd),
                "total_bytes_per_token": round_bytes(fwd + bwd)})
  return out


def _layer_entries(m_cfg, sizes: dict[str, int], geo: MemoryGeometry
                   ) -> tuple[list[tuple[int | str, str, list[Op]]], int]:
  """(block, kind, per-token ops) of the embedding/output and of every
  block's attention, FFN or MoE and memory layer, and the number of MoE
  layers."""
  mem = m_cfg.memory
  b = DTYPE_BYTES[m_cfg.dtype]
  d = m_cfg.d_model
  t, x, mm = sizes.get("tensor", 1), sizes.get("expert", 1), sizes.get("memory", 1)
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
  return entries, moe_layers


def collective_report(cfg, sizes: dict[str, int], params: Iterable[ParamInfo]) -> dict:
  """The ``collectives`` section of ``inspect`` for a ``Config`` and the
  resolved mesh `sizes` (axis -> devices)."""
  m_cfg = cfg.model
  geo = memory_geometry(m_cfg)
  entries, moe_layers = _layer_entries(m_cfg, sizes, geo)
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
      "tokens_per_device": round_bytes(per_device),
      "per_layer": per_layer,
      "per_token": {"fwd": round_bytes(fwd), "bwd": round_bytes(bwd),
                    "total": round_bytes(fwd + bwd)},
      "per_step": per_step,
      "per_device_per_step": {
          "activations": round_bytes((fwd + bwd) * per_device),
          "parameters_and_counters": round_bytes(step_params),
          "total": round_bytes((fwd + bwd) * per_device + step_params)},
  }
