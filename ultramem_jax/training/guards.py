"""Checks made before anything is built, compiled or written: that the run
directory can be written, and that every mesh axis divides the dimensions
it shards."""

from __future__ import annotations

import math
import pathlib
import tempfile

from flax import nnx

from ultramem_jax.config import Config, ConfigError
from ultramem_jax.parallel.memory_sharding import whole_cores
from ultramem_jax.parallel.rules import RULES


def check_writable(run_dir: pathlib.Path) -> None:
  """train.run_dir, or the nearest ancestor that exists, accepts new files."""
  probe_in = run_dir
  while not probe_in.exists():
    if probe_in.parent == probe_in:
      break
    probe_in = probe_in.parent
  if not probe_in.is_dir():
    raise ConfigError(f"train.run_dir: {str(run_dir)!r} cannot be created: "
                      f"{str(probe_in)!r} is not a directory")
  try:
    pathlib.Path(tempfile.mkdtemp(prefix=".write-probe-", dir=probe_in)).rmdir()
  except OSError as e:
    raise ConfigError(f"train.run_dir: {str(run_dir)!r} is not writable "
                      f"({e.strerror} in {str(probe_in)!r})") from None


def check_mesh_divides(cfg: Config, sizes: dict[str, int]) -> None:
  """Every parameter dimension sharded over mesh axes is divisible by the
  product of their sizes; the message names the axis, the parameter and the
  dimension."""
  from ultramem_jax.inspect import abstract_model  # noqa: PLC0415 (cycle)

  mem, m = cfg.model.memory, sizes.get("memory", 1)
  if mem.enabled and mem.table_sharding == "column" and mem.score == "tucker":
    hc = mem.tucker_cores
    if not whole_cores(hc, m):
      raise ConfigError(
          f"mesh.memory: {m} devices and model.memory.tucker_cores={hc} must "
          "divide one another under model.memory.table_sharding=column (each "
          "device's columns belong to whole cores); choose another size or "
          "table_sharding=row")
  moe, x = cfg.model.ffn.moe, sizes.get("expert", 1)
  if cfg.model.ffn.kind == "moe" and x > 1 and moe.capacity_factor > 0:
    raise ConfigError(
        f"mesh.expert: {x} devices need dropless routing, but "
        f"model.ffn.moe.capacity_factor={moe.capacity_factor}; set it to 0 "
        "(expert parallelism exchanges every assignment) or mesh.expert=1")
  model = abstract_model(cfg)
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
