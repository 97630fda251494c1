"""``value_read``: the weighted read of gathered value rows (spec section 2,
step 6) in one pass, forward and backward.

For every token t and kept slot s (row p = slots[t, s], value block
e = blocks[t, s]) the kernel reads V[p] (and P[p]) once and accumulates

    a_ts = <z_t, P[p]>                       (UltraMemV2's pre-values)
    w_tsc = g_tsc * act(a_ts)                (or g_tsc alone: v1, PKM, Memory+)
    o[t, e, chunk c] += w_tsc * V[p, chunk c]

so no [tokens, S, Dv] tensor of gathered rows is ever written to memory.

Backward (``jax.custom_vjp``):

- d g and d a need <do[t, e, chunk c], V[p, chunk c]>: a second gather
  kernel (:func:`row_dots`), reading each row once more;
- d z = sum_s da_ts P[p]: the forward kernel again, with P as the table;
- d V and d P are scatter-adds of [tokens * S] row updates, left to XLA's
  scatter (duplicate rows accumulate). A sorted segment-sum kernel would
  only pay off if it beat XLA's scatter on a real device, which has not
  been measured yet (see BENCHMARKS.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import value_read_tpu as tpu
from pallas_kernels import value_read_triton as triton
from pallas_kernels.backend import (interpret_arg, next_pow2, pad_axis,
                                    resolve, round_up)
from pallas_kernels.reference import ACTIVATIONS


class _Spec(NamedTuple):
  e: int
  activation: str
  out_dtype: str
  backend: str
  interpret: bool
  block_tokens: int
  slot_chunk: int


# --------------------------------------------------------------------------
# The two kernels, padded to each backend's layout
# --------------------------------------------------------------------------


class _Tiles(NamedTuple):
  bt: int      # tokens per grid step
  n_pad: int   # tokens, padded to a multiple of bt
  s_pad: int   # kept slots per token, padded
  sc: int      # slots gathered per loop step (Triton)


def _tiles(spec: _Spec, n: int, s: int) -> _Tiles:
  """TPU: bt a multiple of 8 (sublanes), slots as they are. Triton: every
  size a power of two."""
  if spec.backend == "tpu":
    bt = round_up(spec.block_tokens, 8)
    return _Tiles(bt, round_up(n, bt), s, s)
  bt, s_pad = next_pow2(spec.block_tokens), next_pow2(s)
  return _Tiles(bt, round_up(n, bt), s_pad, min(s_pad, next_pow2(spec.slot_chunk)))


def _pad_slots(x: jax.Array, t: _Tiles) -> jax.Array:
  """[N, S] (slots or value blocks) padded to [n_pad, s_pad] with zeros."""
  return pad_axis(pad_axis(x, 0, t.n_pad), 1, t.s_pad)


def _read(slots, weights, values, z, pre_values, blocks, spec: _Spec):
  """Kernel call. Returns o [E, N, Dv] (out_dtype) and a [N, S] f32 (or
  None without pre-values)."""
  w = jnp.transpose(weights, (2, 0, 1))                      # [hc, N, S]
  has_blocks = blocks is not None and spec.e > 1
  body = _read_tpu if spec.backend == "tpu" else _read_triton
  return body(slots, w, values, z, pre_values, blocks if has_blocks else None,
              spec, _tiles(spec, *slots.shape))


def _read_tpu(slots, w, values, z, pre_values, blocks, spec: _Spec, t: _Tiles):
  """The Mosaic forward kernel; w [hc, N, S], blocks None unless E > 1."""
  hc, n, s = w.shape
  dv, e = values.shape[1], spec.e
  pre, has_blocks = pre_values is not None, blocks is not None
  dp = pre_values.shape[1] if pre else 0
  bt, n_pad = t.bt, t.n_pad
  inputs = [pad_axis(w, 1, n_pad)]
  in_specs = [pl.BlockSpec((hc, bt, s), lambda i: (0, i, 0))]
  if pre:
    inputs.append(pad_axis(z, 0, n_pad))
    in_specs.append(pl.BlockSpec((bt, dp), lambda i: (i, 0)))
  if has_blocks:
    inputs.append(_pad_slots(blocks, t))
    in_specs.append(pl.BlockSpec((bt, s), lambda i: (i, 0)))
  out_shape = [jax.ShapeDtypeStruct((e, n_pad, dv), jnp.dtype(spec.out_dtype))]
  out_specs = [pl.BlockSpec((e, bt, dv), lambda i: (0, i, 0))]
  scratch = [pltpu.VMEM((2, bt, s, dv), values.dtype)]
  if pre:
    out_shape.append(jax.ShapeDtypeStruct((n_pad, s), jnp.float32))
    out_specs.append(pl.BlockSpec((bt, s), lambda i: (i, 0)))
    scratch.append(pltpu.VMEM((2, bt, s, dp), pre_values.dtype))
  scratch += [pltpu.SemaphoreType.DMA((2,))] * (2 if pre else 1)
  kernel = functools.partial(tpu.forward_kernel, bt=bt, s=s, hc=hc, e=e, dv=dv,
                             activation=spec.activation, pre=pre,
                             has_blocks=has_blocks)
  outs = tpu.call(kernel, n_blocks=n_pad // bt, bt=bt, s=s,
                  slots=_pad_slots(slots, t), inputs=inputs,
                  in_specs=in_specs,
                  hbm_tables=[values] + ([pre_values] if pre else []),
                  out_shape=out_shape, out_specs=out_specs, scratch=scratch,
                  interpret=interpret_arg(spec.backend, spec.interpret))
  o = outs[0][:, :n]
  return o, (outs[1][:n] if pre else None)


def _read_triton(slots, w, values, z, pre_values, blocks, spec: _Spec, t: _Tiles):
  """The Triton forward kernel, every size padded to a power of two."""
  hc, n, s = w.shape
  dv, e = values.shape[1], spec.e
  pre, has_blocks = pre_values is not None, blocks is not None
  dp = pre_values.shape[1] if pre else 0
  bt, n_pad, s_pad, sc = t
  dv_pad, dp_pad = next_pow2(dv), next_pow2(max(dp, 1))
  inputs = [_pad_slots(slots, t), pad_axis(pad_axis(w, 1, n_pad), 2, s_pad)]
  in_specs = [pl.BlockSpec((bt, s_pad), lambda i: (i, 0)),
              pl.BlockSpec((hc, bt, s_pad), lambda i: (0, i, 0))]
  if pre:
    inputs.append(pad_axis(pad_axis(z, 0, n_pad), 1, dp_pad))
    in_specs.append(pl.BlockSpec((bt, dp_pad), lambda i: (i, 0)))
  if has_blocks:
    inputs.append(_pad_slots(blocks, t))
    in_specs.append(pl.BlockSpec((bt, s_pad), lambda i: (i, 0)))
  out_shape = [jax.ShapeDtypeStruct((e, n_pad, dv_pad), jnp.dtype(spec.out_dtype))]
  out_specs = [pl.BlockSpec((e, bt, dv_pad), lambda i: (0, i, 0))]
  if pre:
    out_shape.append(jax.ShapeDtypeStruct((n_pad, s_pad), jnp.float32))
    out_specs.append(pl.BlockSpec((bt, s_pad), lambda i: (i, 0)))
  kernel = functools.partial(triton.forward_kernel, sc=sc, hc=hc, e=e, dv=dv,
                             dp=dp, activation=spec.activation, pre=pre,
                             has_blocks=has_blocks)
  outs = triton.call(kernel, n_blocks=n_pad // bt, inputs=inputs,
                     in_specs=in_specs,
                     tables=[values] + ([pre_values] if pre else []),
                     out_shape=out_shape, out_specs=out_specs,
                     interpret=interpret_arg(spec.backend, spec.interpret))
  o = outs[0][:, :n, :dv]
  return o, (outs[1][:n, :s] if pre else None)


def _row_dots(slots, blocks, do, values, hc: int, spec: _Spec):
  """dots[t, s, c] = <do[e_ts, t, chunk c], V[slots[t, s], chunk c]>;
  do [E, N, Dv] f32 -> [N, S, hc] f32."""
  n, s = slots.shape
  dv, e = values.shape[1], spec.e
  has_blocks = blocks is not None and e > 1
  interpret = interpret_arg(spec.backend, spec.interpret)
  t = _tiles(spec, n, s)
  bt, n_pad, s_pad, sc = t
  if spec.backend == "tpu":
    inputs = [pad_axis(do, 1, n_pad)]
    in_specs = [pl.BlockSpec((e, bt, dv), lambda i: (0, i, 0))]
    if has_blocks:
      inputs.append(_pad_slots(blocks, t))
      in_specs.append(pl.BlockSpec((bt, s), lambda i: (i, 0)))
    kernel = functools.partial(tpu.row_dots_kernel, bt=bt, s=s, hc=hc, e=e,
                               dv=dv, has_blocks=has_blocks)
    dots = tpu.call(kernel, n_blocks=n_pad // bt, bt=bt, s=s,
                    slots=_pad_slots(slots, t),
                    inputs=inputs, in_specs=in_specs, hbm_tables=[values],
                    out_shape=jax.ShapeDtypeStruct((hc, n_pad, s), jnp.float32),
                    out_specs=pl.BlockSpec((hc, bt, s), lambda i: (0, i, 0)),
                    scratch=[pltpu.VMEM((2, bt, s, dv), values.dtype),
                             pltpu.SemaphoreType.DMA((2,))],
                    interpret=interpret)
    return jnp.transpose(dots[:, :n], (1, 2, 0))
  dv_pad = next_pow2(dv)
  inputs = [_pad_slots(slots, t), pad_axis(pad_axis(do, 1, n_pad), 2, dv_pad)]
  in_specs = [pl.BlockSpec((bt, s_pad), lambda i: (i, 0)),
              pl.BlockSpec((e, bt, dv_pad), lambda i: (0, i, 0))]
  if has_blocks:
    inputs.append(_pad_slots(blocks, t))
    in_specs.append(pl.BlockSpec((bt, s_pad), lambda i: (i, 0)))
  kernel = functools.partial(triton.row_dots_kernel, sc=sc, hc=hc, e=e, dv=dv,
                             has_blocks=has_blocks)
  dots = triton.call(kernel, n_blocks=n_pad // bt, inputs=inputs,
                     in_specs=in_specs, tables=[values],
                     out_shape=jax.ShapeDtypeStruct((hc, n_pad, s_pad), jnp.float32),
                     out_specs=pl.BlockSpec((hc, bt, s_pad), lambda i: (0, i, 0)),
                     interpret=interpret)
  return jnp.transpose(dots[:, :n, :s], (1, 2, 0))


# --------------------------------------------------------------------------
# custom_vjp
# --------------------------------------------------------------------------


def _to_tokens(o):
  """[E, N, Dv] -> [N, E * Dv] (block-major, as the reference)."""
  e, n, dv = o.shape
  return o.reshape(n, dv) if e == 1 else jnp.transpose(o, (1, 0, 2)).reshape(n, e * dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _value_read(slots, weights, values, z, pre_values, blocks, spec):
  return _to_tokens(_read(slots, weights, values, z, pre_values, blocks, spec)[0])


def _value_read_fwd(slots, weights, values, z, pre_values, blocks, spec):
  o, a = _read(slots, weights, values, z, pre_values, blocks, spec)
  return _to_tokens(o), (slots, weights, values, z, pre_values, blocks, a)


def _value_read_bwd(spec, res, d_out):
  slots, weights, values, z, pre_values, blocks, a = res
  n, s, hc = weights.shape
  dv, e = values.shape[1], spec.e
  do = jnp.transpose(d_out.astype(jnp.float32).reshape(n, e, dv), (1, 0, 2))
  dots = _row_dots(slots, blocks, do, values, hc, spec)      # [N, S, hc]
  w = weights.astype(jnp.float32)
  dz = d_pre = None
  if pre_values is not None:
    f, f_vjp = jax.vjp(ACTIVATIONS[spec.activation], a)
    d_weights = dots * f[..., None]
    (da,) = f_vjp(jnp.sum(w * dots, axis=-1))
    w = w * f[..., None]
    plain = spec._replace(e=1, activation="none", out_dtype="float32")
    dz = _read(slots, da[..., None], pre_values, None, None, None, plain)[0][0]
    d_pre = jnp.zeros(pre_values.shape, jnp.float32).at[slots].add(
        da[..., None] * z.astype(jnp.float32)[:, None, :])
    dz, d_pre = dz.astype(z.dtype), d_pre.astype(pre_values.dtype)
  else:
    d_weights = dots
  # dV[p, chunk c] += w_tsc * do[e_ts, t, chunk c]
  if blocks is None or e == 1:
    d_sel = jnp.broadcast_to(do[0][:, None, :], (n, s, dv))
  else:
    d_sel = do[blocks, jnp.arange(n)[:, None]]
  w_col = jnp.repeat(w, dv // hc, axis=-1)
  d_values = jnp.zeros(values.shape, jnp.float32).at[slots].add(w_col * d_sel)
  return (None, d_weights.astype(weights.dtype), d_values.astype(values.dtype),
          dz, d_pre, None)


_value_read.defvjp(_value_read_fwd, _value_read_bwd)


def value_read(slots: jax.Array, weights: jax.Array, values: jax.Array, *,
               z: jax.Array | None = None, pre_values: jax.Array | None = None,
               activation: str = "none", blocks: jax.Array | None = None,
               num_blocks: int = 1, dtype=jnp.float32,
               backend: str | None = None, interpret: bool = False,
               block_tokens: int | None = None, slot_chunk: int = 16) -> jax.Array:
  """The fused weighted read; same contract as
  :func:`pallas_kernels.reference.value_read_reference` (o [N, E * Dv]),
  differentiable in weights, values, z and pre_values.

  ``backend``: ``tpu`` or ``triton`` (default: the default device's);
  ``interpret``: run in the Pallas interpreter (CPU tests);
  ``block_tokens``: tokens per grid step (default 8 on TPU, 4 on Triton);
  ``slot_chunk``: kept slots gathered per loop step on Triton.
  """
  backend = resolve(backend)
  if slots.ndim != 2 or weights.shape[:2] != slots.shape or weights.ndim != 3:
    raise ValueError(f"value_read: slots {slots.shape} must be [N, S] and weights "
                     f"{weights.shape} [N, S, hc]")
  hc, dv = weights.shape[2], values.shape[1]
  if dv % hc:
    raise ValueError(f"value_read: value width {dv} is not divisible by the "
                     f"{hc} cores of the weights")
  if (z is None) != (pre_values is None):
    raise ValueError("value_read: z and pre_values go together")
  if z is not None and z.shape != (slots.shape[0], pre_values.shape[1]):
    raise ValueError(f"value_read: z {z.shape} must be [N, Dp={pre_values.shape[1]}]")
  if num_blocks > 1 and (blocks is None or blocks.shape != slots.shape):
    raise ValueError("value_read: num_blocks > 1 needs blocks shaped like slots")
  if activation not in ACTIVATIONS:
    raise ValueError(f"value_read: activation {activation!r} not in {sorted(ACTIVATIONS)}")
  if block_tokens is None:
    block_tokens = 8 if backend == "tpu" else 4
  spec = _Spec(num_blocks, activation, jnp.dtype(dtype).name, backend,
               bool(interpret), block_tokens, slot_chunk)
  return _value_read(slots.astype(jnp.int32), weights, values, z, pre_values,
                     None if num_blocks == 1 else blocks.astype(jnp.int32), spec)
