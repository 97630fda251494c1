"""What one decode step reads from memory (spec section 7), by formula.

At decode with a batch of B sequences, one step computes one token per
sequence. Per step it reads:

- every dense weight once: attention, norms, dense FFNs, routers, the
  memory layers' keys, Tucker cores and projections, and the output matrix;
- of the input embedding, the B rows looked up (with tied embeddings the
  whole matrix is read anyway, as the output matrix);
- per MoE layer, at most ``min(B*k, E)`` of its E experts (3*d*d_e weights
  each): the experts the B*k assignments can touch;
- per memory layer, at most ``min(B*m, R)`` rows of its table (m = heads *
  top_m rows per token, R rows), each of Dv values plus Dp pre-values;
  layers sharing one table each read their own rows;
- the KV cache: 2 * L * B * T * kv_heads * head_dim values at context T
  (reported apart: it is not parameters, and grows with T).

The counts are upper bounds where tokens pick the same expert or row; with
B = 1 they are exact.

With ``model.memory.table_memory: host`` the tables are not in accelerator
memory: ``host`` then gives the bytes read from accelerator memory (the
parameters but the tables' rows), the bytes the host reads of its tables
(the same rows) and the bytes moved each way per step
(:func:`host_transfer_bytes`). ``bytes`` use each parameter's stored dtype
(``model.param_dtype``) and the compute dtype for the cache.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model.common import dtype_of
from ultramem_jax.model.memory.host_read import resolve_host_read


@dataclasses.dataclass(frozen=True)
class Param:
  path: str              # e.g. "blocks/3/ffn/w_gate"
  shape: tuple[int, ...]
  itemsize: int

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def _kind(path: str) -> str:
  parts = path.split("/")
  if parts[-1] in ("values", "pre_values") and "table" in parts[-2]:
    return "memory_table"
  if parts[-2:-1] == ["ffn"] and parts[-1] in ("w_gate", "w_up", "w_down"):
    return "ffn"
  if parts[-1] == "token_embed":
    return "embedding"
  return "dense"


def decode_step_bytes(cfg, params: list[Param], batch: int) -> dict:
  """Bytes read from parameters by one decode step of `batch` tokens, by
  kind, and the KV cache at context ``data.seq_len``."""
  m = cfg.model
  moe = m.ffn.kind == "moe"
  mem = m.memory
  readers = {}   # table path prefix -> memory layers reading it
  if mem.enabled:
    placement = memory_geometry(m).placement
    if mem.share_values:
      readers["memory_table"] = len(placement)
    else:
      for src, _ in placement:
        readers[f"blocks/{src}/memory/table"] = 1
  out = {"dense": 0, "embedding": 0, "experts": 0, "memory_rows": 0}
  experts_read = rows_read = 0
  for p in params:
    kind = _kind(p.path)
    if kind == "embedding":
      rows = p.shape[0] if m.tie_embeddings else min(batch, p.shape[0])
      out["embedding"] += rows * math.prod(p.shape[1:]) * p.itemsize
    elif kind == "ffn" and moe:
      e = p.shape[0]
      touched = min(batch * m.ffn.moe.top_k, e)
      out["experts"] += touched * (p.size // e) * p.itemsize
      experts_read += touched if p.path.endswith("w_gate") else 0
    elif kind == "memory_table":
      prefix = p.path.rsplit("/", 1)[0]
      n_layers = readers.get(prefix, 1)
      touched = min(batch * mem.heads * mem.top_m, p.shape[0])
      out["memory_rows"] += n_layers * touched * math.prod(p.shape[1:]) * p.itemsize
      rows_read += n_layers * touched if p.path.endswith("/values") else 0
    else:
      out["dense"] += p.size * p.itemsize
  total = sum(out.values())
  cache_item = jnp.dtype(dtype_of(m.dtype)).itemsize
  kv = 2 * m.n_layers * batch * cfg.data.seq_len * m.kv_heads * m.attn_head_dim
  report = {"batch": batch, "param_bytes": total,
            "param_bytes_per_token": total / batch, "by_kind": out,
            "experts_read": experts_read, "memory_rows_read": rows_read,
            "kv_cache_bytes": kv * cache_item, "context": cfg.data.seq_len}
  if mem.enabled and mem.table_memory == "host":
    report["host"] = {"device_param_bytes": total - out["memory_rows"],
                      "host_table_bytes_read": out["memory_rows"],
                      **host_transfer_bytes(cfg, batch)}
  return report


def host_transfer_bytes(cfg, batch: int, host_read: str | None = None) -> dict:
  """Bytes moved between host and device per decode step of `batch` tokens
  with the tables in host memory (model/memory/host_read.py), summed over
  the memory layers, each layer's S = heads * m slots per token:

  - ``rows``: to the host the kept indices (int32, once per table); to the
    device the kept rows, B * S * (Dv + Dp) in the compute dtype (every
    slot's row, repeats included: the gather is per slot);
  - ``sum``: to the host the indices, the per-core scores (float32,
    B * S * hc), the pre-value inputs (B * Dp) and, with E value blocks,
    the blocks' one-hots (B * S * E); to the device the read, B * E * Dv.

  `host_read` defaults to the config's (``auto``: ``sum``)."""
  m = cfg.model
  mem = m.memory
  mode = resolve_host_read(host_read or mem.host_read)
  geo = memory_geometry(m)
  layers = len(geo.placement)
  item = jnp.dtype(dtype_of(m.dtype)).itemsize
  s = mem.heads * mem.top_m
  dv, dp, e, hc = m.value_dim, mem.pre_value_dim, geo.blocks, mem.tucker_cores
  tables = 2 if dp else 1
  if mode == "rows":
    to_host = batch * s * 4 * tables
    to_device = batch * s * (dv + dp) * item
  else:
    to_host = batch * (s * 4 + s * hc * 4 + dp * item + (s * e * item if e > 1 else 0))
    to_device = batch * e * dv * item
  return {"host_read": mode, "moved_to_host_bytes": layers * to_host,
          "moved_to_device_bytes": layers * to_device}


def decode_report(cfg, params: list[Param],
                  batches: tuple[int, ...] = (1, 8, 64)) -> list[dict]:
  return [decode_step_bytes(cfg, params, b) for b in batches]
