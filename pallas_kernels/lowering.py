"""Lowering the kernels for an accelerator from a machine without one.

``jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))`` runs Mosaic's
lowering on the CPU. Parts of it (the layout of 1-D SMEM blocks) ask for the
hardware description of the *default* device, which on a CPU-only machine is
a CPU, so Mosaic refuses. :func:`register_cpu_as_tpu` registers a TPU chip
description under the CPU's device kind in Mosaic's registry. That registry
is a private interface of JAX (``jax._src.pallas.mosaic.tpu_info``), which
is why ``requirements.txt`` pins the JAX version these tests run with.
Nothing here affects execution on a real TPU, where the device kind is the
TPU's own.
"""

from __future__ import annotations

import jax
from jax._src.pallas.mosaic import tpu_info  # private: the JAX version is pinned
from jax.experimental.pallas import tpu as pltpu


def register_cpu_as_tpu(chip: str = "v5e") -> None:
  """Make Mosaic treat the default CPU device as a single-core TPU `chip`
  when it asks for hardware facts during lowering."""
  version = pltpu.ChipVersion(chip)
  for device in jax.devices("cpu")[:1]:
    tpu_info.registry[device.device_kind] = (
        lambda: pltpu.get_tpu_info_for_chip(version, 1))


def lower_text(fn, *args, platform: str) -> str:
  """StableHLO text of jit(fn)(*args) lowered for `platform` (``tpu`` or
  ``cuda``) without running it."""
  if platform == "tpu":
    register_cpu_as_tpu()
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
