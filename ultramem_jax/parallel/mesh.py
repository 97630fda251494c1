"""The ``mesh`` section of the config, the one check of a mesh against a
config, and building the device mesh.

Every mesh rule is here: at most one axis of -1 (``validate_mesh``, when the
config is read), the -1 axis filled so that the mesh uses every device
(``mesh_shape``), and, in ``check_mesh`` (what training and ``inspect``
call before anything is compiled), the batch split over the batch axes and
every sharded parameter dimension divisible by its shards, Tucker cores
whole on every device and dropless routing under expert parallelism."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ultramem_jax.config import ConfigError, require
from ultramem_jax.parallel.memory_sharding import whole_cores
from ultramem_jax.parallel.rules import (LOGICAL_AXIS_RULES, RULES, batch_shards,
                                         logical_to_mesh)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh; one size per axis, -1 means "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  memory: int = 1

  @property
  def axis_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(self))


def validate_mesh(cfg: MeshConfig) -> None:
  """The rules of the ``mesh`` section alone: sizes are positive or -1, and
  at most one axis is -1."""
  sizes = {name: getattr(cfg, name) for name in cfg.axis_names}
  for name, size in sizes.items():
    require(size == -1 or size >= 1, f"mesh.{name}", size,
            "must be a positive device count or -1 (all remaining devices)")
  auto = [name for name, size in sizes.items() if size == -1]
  require(len(auto) <= 1, f"mesh.{auto[-1] if auto else ''}", -1,
          f"only one mesh axis may be -1, got {auto}")


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


def mesh_sizes(cfg: MeshConfig, n_devices: int | None = None) -> dict[str, int]:
  """Axis sizes of the mesh over `n_devices` (default: the devices JAX sees
  when an axis is -1, else the product of the sizes given)."""
  sizes = [getattr(cfg, a) for a in cfg.axis_names]
  given = n_devices is not None
  if not given:
    n_devices = jax.device_count() if -1 in sizes else math.prod(sizes)
  try:
    return dict(zip(cfg.axis_names, mesh_shape(cfg, n_devices)))
  except ConfigError as e:
    if given:
      raise
    raise ConfigError(f"{e} (JAX sees {n_devices} here; inspect --devices N "
                      "sizes the mesh for N devices)") from None


def check_mesh(cfg: Any, model: Any | None, n_devices: int | None = None, *,
               batch: bool = True) -> dict[str, int]:
  """The one check of the mesh of the root config `cfg` against its data
  and `model` (the abstract Transformer, ``model/abstract.py``): returns the
  axis sizes over `n_devices` (see ``mesh_sizes``) or raises ConfigError
  naming the key. `batch`: also check that data.batch_size splits over the
  batch axes (training; ``inspect`` counts a model, it has no batch).
  `model` None checks the sizes and the batch alone: training does that
  first, before it reads any data, and checks the layout once the
  tokenizer has fixed the vocabulary."""
  validate_mesh(cfg.mesh)
  sizes = mesh_sizes(cfg.mesh, n_devices)
  if batch:
    check_batch(cfg.data.batch_size, sizes)
  if model is not None:
    check_layout(cfg.model, sizes, model)
  return sizes


def check_batch(batch_size: int, sizes: dict[str, int]) -> None:
  """data.batch_size is divisible by the product of the batch axes."""
  shards = batch_shards(sizes)
  if batch_size % shards:
    raise ConfigError(
        f"data.batch_size: got {batch_size}; must be divisible by "
        f"mesh.data * mesh.fsdp * mesh.expert * mesh.memory = {shards} (the "
        "batch is split over all four)")


def check_layout(model_cfg: Any, sizes: dict[str, int], model: Any) -> None:
  """The model config `model_cfg` and the parameters of `model` fit the mesh
  `sizes`: whole Tucker cores per device under column sharding, dropless
  routing under expert parallelism, and every parameter dimension sharded
  over mesh axes divisible by the product of their sizes (the message names
  the axis, the parameter and the dimension)."""
  mem, m = model_cfg.memory, sizes.get("memory", 1)
  if mem.enabled and mem.table_sharding == "column" and mem.score == "tucker":
    hc = mem.tucker_cores
    if not whole_cores(hc, m):
      raise ConfigError(
          f"mesh.memory: {m} devices and model.memory.tucker_cores={hc} must "
          "divide one another under model.memory.table_sharding=column (each "
          "device's columns belong to whole cores); choose another size or "
          "table_sharding=row")
  moe, x = model_cfg.ffn.moe, sizes.get("expert", 1)
  if model_cfg.ffn.kind == "moe" and x > 1 and moe.capacity_factor > 0:
    raise ConfigError(
        f"mesh.expert: {x} devices need dropless routing, but "
        f"model.ffn.moe.capacity_factor={moe.capacity_factor}; set it to 0 "
        "(expert parallelism exchanges every assignment) or mesh.expert=1")
  for path, var in nnx.to_flat_state(nnx.state(model)):
    names = var.get_metadata().get("out_sharding") or ()
    for dim, (size, name) in enumerate(zip(var.shape, names)):
      axes = RULES.get(name) if name is not None else None
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      shards = math.prod(sizes[a] for a in axes)
      if size % shards:
        where = "/".join(map(str, path))
        raise ConfigError(
            f"mesh.{'*'.join(axes)}: {shards} shards do not divide dimension "
            f"{dim} (size {size}, logical axis {name!r}) of {where}; choose "
            "mesh sizes that divide it")


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
