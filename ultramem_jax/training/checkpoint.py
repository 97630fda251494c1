"""Orbax checkpoints of one run: train state, data-iterator position, config.

A checkpoint step directory holds three items: ``state`` (model parameters
and optimizer state, restored with their shardings), ``data`` (the grain
iterator's position) and ``meta`` (the resolved config and the step's
metrics, as JSON). Orbax writes each step into a temporary directory and
renames it when complete, so a step that is listed is whole.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator,
           meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None) -> tuple[Any, dict]:
    """Restores `state` onto the shardings of `abstract_state` (a tree of
    jax.ShapeDtypeStruct); moves `data_iter` to its saved position."""
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
