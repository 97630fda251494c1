"""The collectives of one layer, in bytes per token, and the ring-schedule
costs of the primitives they are built from; the formulas are derived in
:mod:`ultramem_jax.parallel.collective_cost`."""

from __future__ import annotations

import dataclasses

INT32 = 4


def round_bytes(x: float) -> float | int:
  """A byte count as reported: an int when whole, else 3 decimals."""
  return int(x) if float(x).is_integer() else round(x, 3)


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
           "group": self.group,
           "bytes_per_token_fwd": round_bytes(self.fwd),
           "bytes_per_token_bwd": round_bytes(self.bwd),
           "op_bwd": self.backward_op}
    if self.approximate:
      out["approximate"] = True
    return out



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
