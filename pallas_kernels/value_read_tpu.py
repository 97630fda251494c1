"""Mosaic TPU bodies of the value read: rows fetched by manual DMA.

The slot indices of a block of tokens are copied to SMEM (a blocked SMEM
input, one [bt, S] block of indices per grid step, plus the next block's
as a second input so its rows can be requested early). Each kept row is one
DMA from the table in HBM into a VMEM buffer; two buffers alternate, so the
rows of block i+1 are in flight while block i is being summed (the pattern
of JAX's TPU paged-attention kernel). The grid therefore runs in order
(``arbitrary``). Compute is vector work on [bt, S, D] tiles in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunks import chunk_ids, column_weights, core_sums, select_block
from pallas_kernels.reference import ACTIVATIONS


def _copies(slots_ref, tables, bufs, sems, slot, *, bt: int, s: int, start: bool):
  """Start (or wait for) one DMA per (token, kept slot, table)."""
  def body(j, carry):
    t, k = j // s, j % s
    row = slots_ref[t, k] if start else 0
    for table, buf, sem in zip(tables, bufs, sems):
      copy = pltpu.make_async_copy(table.at[pl.ds(row, 1)],
                                   buf.at[slot, t, pl.ds(k, 1)], sem.at[slot])
      if start:
        copy.start()
      else:
        copy.wait()
    return carry
  jax.lax.fori_loop(0, bt * s, body, 0)


def _pipelined_rows(slots_cur, slots_nxt, tables, bufs, sems, *, bt, s):
  """Double-buffered fetch: returns the buffer index holding this step's
  rows, after requesting the next step's."""
  i, nb = pl.program_id(0), pl.num_programs(0)
  slot = i % 2

  @pl.when(i == 0)
  def _():
    _copies(slots_cur, tables, bufs, sems, slot, bt=bt, s=s, start=True)

  @pl.when(i + 1 < nb)
  def _():
    _copies(slots_nxt, tables, bufs, sems, 1 - slot, bt=bt, s=s, start=True)

  _copies(slots_cur, tables, bufs, sems, slot, bt=bt, s=s, start=False)
  return slot


def forward_kernel(*refs, bt: int, s: int, hc: int, e: int, dv: int,
                   activation: str, pre: bool, has_blocks: bool):
  """o[e] = sum_s [e_s = e] w_c act(<z, P[p_s]>) V[p_s] (per column chunk c).

  refs: slots_cur, slots_nxt (SMEM [bt, S]), w [hc, bt, S], (z [bt, Dp]),
  (blocks [bt, S]), V (HBM), (P (HBM)) | o [E, bt, Dv], (a [bt, S]) |
  vbuf [2, bt, S, Dv], (pbuf), vsem, (psem).
  """
  refs = list(refs)
  slots_cur, slots_nxt, w_ref = refs[:3]
  del refs[:3]
  z_ref = refs.pop(0) if pre else None
  blk_ref = refs.pop(0) if has_blocks else None
  v_hbm = refs.pop(0)
  p_hbm = refs.pop(0) if pre else None
  o_ref = refs.pop(0)
  a_ref = refs.pop(0) if pre else None
  vbuf = refs.pop(0)
  pbuf = refs.pop(0) if pre else None
  vsem = refs.pop(0)
  psem = refs.pop(0) if pre else None

  tables, bufs, sems = [v_hbm], [vbuf], [vsem]
  if pre:
    tables, bufs, sems = tables + [p_hbm], bufs + [pbuf], sems + [psem]
  slot = _pipelined_rows(slots_cur, slots_nxt, tables, bufs, sems, bt=bt, s=s)

  w = [w_ref[c].astype(jnp.float32) for c in range(hc)]
  if pre:
    prow = pbuf[slot].astype(jnp.float32)                     # [bt, S, Dp]
    a = jnp.sum(prow * z_ref[...].astype(jnp.float32)[:, None, :], axis=2)
    a_ref[...] = a
    f = ACTIVATIONS[activation](a)
    w = [wc * f for wc in w]
  wcol = column_weights(w, chunk_ids(dv, dv, hc))
  rows = vbuf[slot].astype(jnp.float32)                       # [bt, S, Dv]
  for b in range(e):
    wb = wcol if blk_ref is None else jnp.where(
        (blk_ref[...] == b)[:, :, None], wcol, 0.0)
    o_ref[b] = jnp.sum(wb * rows, axis=1).astype(o_ref.dtype)


def row_dots_kernel(*refs, bt: int, s: int, hc: int, e: int, dv: int,
                    has_blocks: bool):
  """dots[c, t, s] = <do[e_s, t, chunk c], V[p_ts, chunk c]>: the backward
  of the weighted sum with respect to its weights.

  refs: slots_cur, slots_nxt (SMEM), do [E, bt, Dv], (blocks [bt, S]),
  V (HBM) | dots [hc, bt, S] | vbuf [2, bt, S, Dv], vsem.
  """
  refs = list(refs)
  slots_cur, slots_nxt, do_ref = refs[:3]
  del refs[:3]
  blk_ref = refs.pop(0) if has_blocks else None
  v_hbm, dots_ref, vbuf, vsem = refs
  slot = _pipelined_rows(slots_cur, slots_nxt, [v_hbm], [vbuf], [vsem], bt=bt, s=s)
  rows = vbuf[slot].astype(jnp.float32)                       # [bt, S, Dv]
  dsel = select_block(None if blk_ref is None else blk_ref[...][:, :, None],
                      [do_ref[b].astype(jnp.float32)[:, None, :] for b in range(e)])
  for c, dots in enumerate(core_sums(rows * dsel, chunk_ids(dv, dv, hc), hc)):
    dots_ref[c] = dots


def call(kernel, *, n_blocks: int, bt: int, s: int, slots, inputs, in_specs,
         hbm_tables, out_shape, out_specs, scratch, interpret):
  """pallas_call with the two SMEM index inputs and the HBM tables added."""
  idx_specs = [
      pl.BlockSpec((bt, s), lambda i: (i, 0), memory_space=pltpu.SMEM),
      pl.BlockSpec((bt, s), lambda i: (jnp.minimum(i + 1, n_blocks - 1), 0),
                   memory_space=pltpu.SMEM),
  ]
  table_specs = [pl.BlockSpec(memory_space=pl.ANY) for _ in hbm_tables]
  return pl.pallas_call(
      kernel,
      grid=(n_blocks,),
      in_specs=idx_specs + in_specs + table_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
  )(slots, slots, *inputs, *hbm_tables)
