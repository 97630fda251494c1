"""Collective costs (parallel/collective_cost.py, the ``collectives`` section
of ``inspect``): the formulas against hand-worked numbers, and the memory
layer's numbers against the collectives XLA compiles for a (data=2,
memory=4) mesh of 8 emulated CPU devices.

Bytes per token = bytes one device sends / tokens it processes, with ring
costs for a group of m: all-gather (m-1)/m of the result, reduce-scatter
(m-1)/m of the operand, all-reduce 2(m-1)/m, all-to-all (m-1)/m.
"""

from __future__ import annotations

import collections
import json
import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ultramem_jax import inspect as I
from ultramem_jax.model.transformer import Transformer
from ultramem_jax.parallel import collective_ops as CO
from ultramem_jax.parallel import collective_step as CS
from ultramem_jax.parallel.mesh import MeshConfig, batch_sharding, make_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.step import loss_fn


def fwd_bwd(ops):
  return [(o.op, o.fwd, o.backward_op, o.bwd) for o in ops]


# --------------------------------------------------------------- by hand


def test_memory_layer_column_by_hand():
  # M = 4 devices, S = 1 head x 4 slots, hc = 2 cores, E = 1, Dv = Dp = 16,
  # float32. A device's token reaches the 3 others: gathers cost 3 x bytes.
  ops = CO.memory_layer_ops(group=4, slots=4, cores=2, blocks=1, value_dim=16,
                            pre_value_dim=16, dtype_bytes=4, mode="column")
  assert fwd_bwd(ops) == [
      ("all-gather", 3 * 4 * 4, None, 0),                        # slots: 48
      ("all-gather", 3 * 4 * 4 * 2, "reduce-scatter", 96),       # scores: 96
      ("all-gather", 3 * 16 * 4, "reduce-scatter", 192),         # z: 192
      # a [Ng, 4] f32 on each device (Ng = 4 tokens per token): 2 * 3/4 * 64
      ("all-reduce", 96, "all-reduce", 96),
      # [Ng, 1, 16/4] f32 per device = 16 * 4 bytes per token, 3/4 leaves
      ("all-to-all", 48, "all-to-all", 48)]
  assert sum(o.fwd for o in ops) == 480 and sum(o.bwd for o in ops) == 432


def test_memory_layer_row_with_blocks_by_hand():
  # M = 2, S = 2 heads x 3 = 6, hc = 1, E = 4 blocks, Dv = 8, no pre-values,
  # bfloat16: no z, no psum; blocks gathered; partial outputs [Ng, 32] f32
  # reduce-scattered: (2-1)/2 of 2 tokens x 32 x 4 bytes = 128 per token.
  ops = CO.memory_layer_ops(group=2, slots=6, cores=1, blocks=4, value_dim=8,
                            pre_value_dim=0, dtype_bytes=2, mode="row")
  assert fwd_bwd(ops) == [("all-gather", 24, None, 0), ("all-gather", 24, None, 0),
                          ("all-gather", 24, "reduce-scatter", 24),
                          ("reduce-scatter", 128, "all-gather", 128)]
  assert CO.memory_layer_ops(group=1, slots=6, cores=1, blocks=4, value_dim=8,
                             pre_value_dim=8, dtype_bytes=2) == []


def test_moe_and_tensor_by_hand():
  # X = 4, k = 8, d = 128, bfloat16: 8 x 128 x 2 = 2048 bytes of each
  # token's assignments, 3/4 leave: 1536 out, 1536 back.
  ops = CO.moe_layer_ops(group=4, top_k=8, d_model=128, dtype_bytes=2)
  assert [(o.fwd, o.bwd) for o in ops] == [(1536, 1536), (1536, 1536)]
  assert CO.moe_layer_ops(group=1, top_k=8, d_model=128, dtype_bytes=2) == []
  # T = 2: all-reduce of 128 x 4 bytes, 2 x 1/2 of it sent.
  (op,) = CO.tensor_ops(group=2, d_model=128, dtype_bytes=4, part="x")
  assert (op.fwd, op.bwd, op.approximate) == (512, 512, True)


def test_param_step_ops_by_hand():
  sizes = {"data": 2, "fsdp": 2, "tensor": 1, "expert": 1, "memory": 4}
  params = [
      # [100, 8] f32 sharded over fsdp ("embed"), replicated over data, memory
      CS.ParamInfo("blocks/0/ffn/w_gate", 800, 4, ("embed", None)),
      # a table [36, 16] f32 column-sharded over memory, read in place
      CS.ParamInfo("blocks/0/memory/table/values", 576, 4,
                   ("memory_rows", "memory_value")),
  ]
  rows = {(r["op"], r["what"].split(": ")[1], tuple(r["axes"])): r["bytes_per_device"]
          for r in CS.param_step_ops(params, sizes)}
  assert rows == {
      # 3200 bytes gathered from halves: 1600 sent; the gradient back likewise
      ("all-gather", "other parameters", ("fsdp",)): 1600,
      ("reduce-scatter", "other parameters", ("fsdp",)): 1600,
      # the 1600-byte shard all-reduced over data x memory = 8: 2 x 7/8 x 1600
      ("all-reduce", "other parameters", ("data", "memory")): 2800,
      # the table's 576 bytes stay on 4 devices (576 each); over data x fsdp
      ("all-reduce", "memory tables", ("data", "fsdp")): 2 * 3 / 4 * 576,
  }
  stamps, = CS.counter_step_ops(memory_rows=[36, 36], moe_experts=[], sizes=sizes)
  assert stamps["group"] == 16 and stamps["bytes_per_device"] == 2 * 2 * 15 / 16 * 144
  # 3 MoE layers of 8 experts over expert = 4 (and 16 batch devices):
  # counts [4, 8] int32 gathered, 3/4 of 128 bytes each; router statistics
  # 8 x 4 + 8 x 4 bytes all-reduced, 2 x 15/16 of 64 each.
  stats, counts = CS.counter_step_ops(memory_rows=[], moe_experts=[8] * 3,
                                      sizes=dict(sizes, expert=4, memory=1))
  assert counts["bytes_per_device"] == 3 * 96
  assert stats["bytes_per_device"] == 3 * 2 * 15 / 16 * 64


# --------------------------------------------------------- against XLA

# The test_sharding model: 2 blocks, memory layer in each, 36 table rows,
# heads 1, m = 4 (S = 4), hc = 2, Dv = Dp = 16; 8 x 8 = 64 tokens, 8 per device.
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.ffn.inner_dim=64", "model.vocab_size=257", "data.tokenizer=bytes",
        "data.seq_len=8", "data.batch_size=8", "model.memory.layers=all",
        "model.memory.n_keys=6", "model.memory.key_dim=8", "model.memory.top_m=4",
        "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
        "model.memory.init_samples=32", "model.memory.kernels=xla",
        "mesh.data=2", "mesh.memory=4"]
ITEMSIZE = {"f32": 4, "s32": 4, "bf16": 2, "f64": 8, "pred": 1, "u32": 4}
KINDS = "all-gather|all-to-all|reduce-scatter|all-reduce"


def group_size(line: str) -> int:
  """Devices in one replica group of a collective's HLO line."""
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if listed:
    return len(listed.group(1).split(","))
  named = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", line)
  if named:   # mesh['axis_0'=4,...] ... {'axis_0'}: the product of those axes
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", line)
  return int(iota.group(1))


def hlo_collectives(text: str, tokens_per_device: int) -> list[dict]:
  """Every collective of compiled HLO with its bytes per token by the
  module's definition, from its result shapes (all-to-all: the tuple of
  the m pieces a device holds)."""
  found = []
  for line in text.splitlines():
    m = re.match(rf"\s*(?:ROOT )?%\S+ = (.+?) ({KINDS})(?:-start)?\(", line)
    if not m:
      continue
    size = sum(ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
    g, kind = group_size(line), m.group(2)
    sent = {"all-gather": CO.all_gather(size, g), "all-to-all": CO.all_to_all(size, g),
            "all-reduce": CO.all_reduce(size, g),
            "reduce-scatter": (g - 1) * size}[kind]   # size: the result, 1/g
    name = re.search(r'op_name="([^"]*)"', line)
    shapes = [(t, tuple(int(d) for d in dims.split(",") if d))
              for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
    found.append({"op": kind, "group": g, "bytes": sent, "shapes": shapes,
                  "per_token": sent / tokens_per_device,
                  "name": name.group(1) if name else ""})
  return found


def compiled_grads(cfg, **mesh_sizes) -> str:
  """Compiled HLO of the jitted loss and gradients (forward and backward)
  of the abstract model (nothing is initialised: parameters placed by the
  rules table, as the train step places them)."""
  mesh = make_mesh(MeshConfig(**mesh_sizes))
  with use_mesh(mesh):
    graph, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((8, 8), jnp.int32, sharding=batch_sharding(mesh))

    def grads(state, batch):
      return nnx.value_and_grad(loss_fn, has_aux=True)(nnx.merge(graph, state), batch)

    return jax.jit(grads).lower(state, {"inputs": tokens, "targets": tokens}) \
        .compile().as_text()


@pytest.mark.parametrize("mode,blocks", [("column", 1), ("row", 4)])
def test_memory_layer_bytes_equal_compiled_hlo(mode, blocks):
  """How HLO ops are matched: the memory layer's collectives are those its
  ``shard_map`` emits, whose op_name contains ``shard_map/`` (top-k's
  shard_maps emit none), over groups of 4 devices (the memory axis; data
  has 2); forward without ``transpose(`` in the op_name, backward with it.
  Their bytes per token, as a multiset of (op, bytes), equal the formula's
  ops times the 2 layers. Per step: the shard_map's all-reduces over groups
  of 2 (its transpose summing the tables' gradients over ``data``) and the
  forward all-gathers outside shard_map (w_p, w_o over ``memory``) equal
  the per-step formula. float32 only: XLA's CPU compile widens bfloat16
  collectives to float32."""
  cfg = load_config("configs/tiny_dense.yaml", TINY + [
      f"model.memory.table_sharding={mode}",
      f"model.memory.value_expansion={blocks}"])
  report = I.inspect_config(cfg, devices=8)["collectives"]
  assert report["mesh"]["memory"] == 4 and report["tokens_per_device"] == 8
  (mem,) = [e for e in report["per_layer"] if e["kind"] == "memory"]
  assert mem["layers"] == [0, 1]
  want_fwd = collections.Counter(
      (o["op"], o["bytes_per_token_fwd"]) for o in mem["ops"] for _ in range(2))
  want_bwd = collections.Counter(
      (o["op_bwd"], o["bytes_per_token_bwd"]) for o in mem["ops"]
      if o["op_bwd"] for _ in range(2))
  step = {(e["op"], e["what"], tuple(e["axes"])): e["bytes_per_device"]
          for e in report["per_step"]}

  ops = hlo_collectives(compiled_grads(cfg, data=2, memory=4), tokens_per_device=8)
  ours = [o for o in ops if "shard_map/" in o["name"] and o["group"] == 4]
  got_fwd = collections.Counter((o["op"], o["per_token"]) for o in ours
                                if "transpose(" not in o["name"])
  got_bwd = collections.Counter((o["op"], o["per_token"]) for o in ours
                                if "transpose(" in o["name"])
  assert got_fwd == want_fwd
  assert got_bwd == want_bwd

  tables = [o["bytes"] for o in ops if "shard_map/" in o["name"] and o["group"] == 2]
  assert tables and sum(tables) == \
      step[("all-reduce", "gradients: memory tables", ("data",))]
  gathers = [o["bytes"] for o in ops if o["op"] == "all-gather" and o["group"] == 4
             and "shard_map/" not in o["name"] and "transpose(" not in o["name"]]
  assert len(gathers) == 4 and sum(gathers) == \
      step[("all-gather", "parameters before use: other parameters", ("memory",))]


def test_moe_dispatch_equals_compiled_hlo():
  """The expert-parallel MoE (parallel/expert_sharding.py) on (data=2,
  expert=4), 1 block, E = 8 experts, k = 2, d = 32: 8 tokens and a = 16
  assignments per device. XLA:CPU runs the dense emulation of
  ragged_all_to_all, which sends its [a, d] operand to every device: the
  dispatch all-to-all (float32 pieces [a, d], in shard_map, group 4) moves
  X = 4 times the ragged formula, forward and backward. (The combine is
  sent from the worst-case [X*a, d] receive buffer, X^2 times; not checked.)
  The counts all-gather [X, E] int32 and the experts' gradient all-reduce
  over data (the shard_map's transpose, groups of 2) equal the per-step
  formula."""
  pytest.importorskip("ultramem_jax.parallel.expert_sharding")
  cfg = load_config("configs/tiny_moe.yaml", [
      "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
      "model.vocab_size=257", "data.tokenizer=bytes", "data.seq_len=8",
      "data.batch_size=8", "model.ffn.moe.num_experts=8", "model.ffn.moe.top_k=2",
      "model.ffn.moe.expert_dim=16", "mesh.data=2", "mesh.expert=4"])
  report = I.inspect_config(cfg, devices=8)["collectives"]
  (moe,) = [e for e in report["per_layer"] if e["kind"] == "moe"]
  dispatch = moe["ops"][0]
  assert dispatch["bytes_per_token_fwd"] == 2 * 32 * 4 * 3 / 4   # k d b (X-1)/X
  step = {(e["op"], e["what"], tuple(e["axes"])): e["bytes_per_device"]
          for e in report["per_step"]}

  ops = [o for o in hlo_collectives(compiled_grads(cfg, data=2, expert=4), 8)
         if "shard_map/" in o["name"]]
  pieces = [o for o in ops if o["op"] == "all-to-all"
            and o["shapes"] == [("f32", (16, 32))] * 4]
  fwd = [o["per_token"] for o in pieces if "transpose(" not in o["name"]]
  bwd = [o["per_token"] for o in pieces if "transpose(" in o["name"]]
  assert fwd == [4 * dispatch["bytes_per_token_fwd"]]
  assert bwd == [4 * dispatch["bytes_per_token_bwd"]]
  (counts,) = [o for o in ops if o["op"] == "all-gather"]
  assert counts["shapes"] == [("s32", (4, 8))] and counts["bytes"] == \
      step[("all-gather", "per-expert counts [E] int32, 1 layers", ("expert",))]
  (grads,) = [o for o in ops if o["group"] == 2]
  assert grads["bytes"] == step[("all-reduce", "gradients: MoE experts", ("data",))]


# ------------------------------------------------------------------ CLI


def test_cli_json_devices_and_table(capsys):
  args = ["configs/tiny_ultramem_v2.yaml", "mesh.memory=4"]
  assert I.main(args + ["--devices", "8"]) == 0
  out = json.loads(capsys.readouterr().out)["collectives"]
  assert out["mesh"]["data"] == 2 and out["mesh"]["memory"] == 4
  (mem,) = [e for e in out["per_layer"] if e["kind"] == "memory"]
  assert mem["layers"] == [0, 1, 2, 3]
  assert out["per_token"]["fwd"] == 4 * mem["bytes_per_token_fwd"]

  assert I.main(args + ["--devices=8", "--table"]) == 0
  text = capsys.readouterr().out
  assert "all-to-all" in text and "memory x4" in text

  # 3 devices on `memory` do not divide the 2 Tucker cores (column mode)
  assert I.main(["configs/tiny_ultramem_v2.yaml", "mesh.memory=3",
                 "--devices", "6"]) == 2
  assert "tucker_cores=2" in capsys.readouterr().err
  assert I.main(args + ["--devices", "six"]) == 2
