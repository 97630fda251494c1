"""Pallas Triton bodies of the value read (NVIDIA GPUs).

One program per ``bt`` tokens loops over their kept slots ``sc`` at a time;
each step is a vector gather load ``table[idx[:, :, None], cols]`` of
[bt, sc, D] rows straight from global memory (masked to the real width:
Triton needs power-of-two shapes, the tables are not padded), so only
[bt, D] accumulators live in registers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.chunks import chunk_ids, column_weights, core_sums, select_block
from pallas_kernels.reference import TRITON_ACTIVATIONS


def _gather(table, idx, width: int, width_pad: int):
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, 1, width_pad), 2)
  return pltr.load(table.at[idx[:, :, None], cols], mask=cols < width,
                   other=0.0).astype(jnp.float32)


def forward_kernel(*refs, sc: int, hc: int, e: int, dv: int, dp: int,
                   activation: str, pre: bool, has_blocks: bool):
  """refs: slots [bt, S], w [hc, bt, S], (z [bt, Dp_pad]), (blocks [bt, S]),
  V, (P) (global) | o [E, bt, Dv_pad], (a [bt, S])."""
  refs = list(refs)
  slots_ref, w_ref = refs[:2]
  del refs[:2]
  z_ref = refs.pop(0) if pre else None
  blk_ref = refs.pop(0) if has_blocks else None
  v_ref = refs.pop(0)
  p_ref = refs.pop(0) if pre else None
  o_ref = refs.pop(0)
  a_ref = refs.pop(0) if pre else None
  bt, s = slots_ref.shape
  dv_pad = o_ref.shape[-1]
  chunk = chunk_ids(dv, dv_pad, hc)

  def step(j, acc):
    sl = pl.ds(j * sc, sc)
    idx = slots_ref[:, sl]
    w = [w_ref[c, :, sl].astype(jnp.float32) for c in range(hc)]
    if pre:
      prow = _gather(p_ref, idx, dp, z_ref.shape[-1])
      a = jnp.sum(prow * z_ref[...].astype(jnp.float32)[:, None, :], axis=2)
      a_ref[:, sl] = a
      f = TRITON_ACTIVATIONS[activation](a)
      w = [wc * f for wc in w]
    contrib = column_weights(w, chunk) * _gather(v_ref, idx, dv, dv_pad)
    if blk_ref is None:
      return (acc[0] + jnp.sum(contrib, axis=1),)
    blk = blk_ref[:, sl][:, :, None]
    return tuple(acc[b] + jnp.sum(jnp.where(blk == b, contrib, 0.0), axis=1)
                 for b in range(e))

  acc = tuple(jnp.zeros((bt, dv_pad), jnp.float32) for _ in range(e))
  acc = jax.lax.fori_loop(0, s // sc, step, acc)
  for b in range(e):
    o_ref[b] = acc[b].astype(o_ref.dtype)


def row_dots_kernel(*refs, sc: int, hc: int, e: int, dv: int, has_blocks: bool):
  """refs: slots [bt, S], do [E, bt, Dv_pad], (blocks [bt, S]), V (global)
  | dots [hc, bt, S]."""
  refs = list(refs)
  slots_ref, do_ref = refs[:2]
  del refs[:2]
  blk_ref = refs.pop(0) if has_blocks else None
  v_ref, dots_ref = refs
  dv_pad = do_ref.shape[-1]
  chunk = chunk_ids(dv, dv_pad, hc)
  do = [do_ref[b].astype(jnp.float32)[:, None, :] for b in range(e)]

  def step(j, carry):
    sl = pl.ds(j * sc, sc)
    idx = slots_ref[:, sl]
    dsel = select_block(None if blk_ref is None else blk_ref[:, sl][:, :, None], do)
    prod = _gather(v_ref, idx, dv, dv_pad) * dsel
    for c, dots in enumerate(core_sums(prod, chunk, hc)):
      dots_ref[c, :, sl] = dots
    return carry

  jax.lax.fori_loop(0, slots_ref.shape[1] // sc, step, 0)


def call(kernel, *, n_blocks: int, inputs, in_specs, tables, out_shape,
         out_specs, interpret, num_warps: int = 4):
  return pl.pallas_call(
      kernel,
      grid=(n_blocks,),
      in_specs=in_specs + [pl.BlockSpec(memory_space=pl.ANY) for _ in tables],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(*inputs, *tables)
