"""Building the device mesh named by the ``mesh`` section of the config."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ultramem_jax.config import ConfigError, MeshConfig
from ultramem_jax.parallel.rules import LOGICAL_AXIS_RULES, logical_to_mesh


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
  """Axis sizes with the -1 axis filled in; checks they use every device."""
  sizes = [getattr(cfg, name) for name in cfg.axis_names]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      axis = cfg.axis_names[sizes.index(-1)]
      raise ConfigError(
          f"mesh.{axis}: -1 cannot be filled, the other axes use {fixed} "
          f"devices, which does not divide the {n_devices} available")
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    shown = ", ".join(f"{n}={s}" for n, s in zip(cfg.axis_names, sizes))
    raise ConfigError(
        f"mesh: sizes {shown} use {math.prod(sizes)} devices but "
        f"{n_devices} are available; make their product {n_devices} "
        "(one axis may be -1)")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, cfg.axis_names,
                       axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def single_device_mesh() -> Mesh:
  """A mesh over the first device only (tests, inspection, evaluation)."""
  return make_mesh(MeshConfig(data=1), jax.devices()[:1])


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
  """Mesh and logical rules in effect while building and running a model."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(("activation_batch", None)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
