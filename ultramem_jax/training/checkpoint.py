"""Orbax checkpoints of one run: train state, data-iterator position, config.

A checkpoint step directory holds three items: ``state`` (model parameters,
buffers and optimizer state, restored with their shardings), ``data`` (the
grain iterator's position) and ``meta`` (the resolved config, the step's
metrics and a fingerprint of every array). Orbax writes each step into a
temporary directory and renames it when complete, so a step that is listed
is whole; the fingerprints catch what orbax cannot see, such as a file
truncated or deleted afterwards (a missing array chunk would otherwise be
read back as zeros).

:meth:`Checkpointer.restore_latest` walks back from the newest step until
one restores and verifies; each one that does not is reported and moved
aside to ``<checkpoints>.unreadable/`` (never deleted). A checkpoint whose
shapes differ from the model's is a configuration error, not damage: it
stops the run with the first mismatched parameter named.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ultramem_jax.config import ConfigError


class CheckpointMismatch(ConfigError):
  """The checkpoint was written for a model of other shapes."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def _readable(key: str) -> str:
  """'0/blocks/3/attn/wq/value' -> 'model/blocks/3/attn/wq' ('1/...' is
  the optimizer's)."""
  head, _, rest = key.removesuffix("/value").partition("/")
  return {"0": "model", "1": "optimizer"}.get(head, head) + ("/" + rest if rest else "")


def _leaves(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(p): x for p, x in flat}


@jax.jit
def _fingerprints(arrays: list[jax.Array]) -> list[jax.Array]:
  """Per array, the sum of its bit patterns modulo 2**32: exact, and the
  same for any sharding or reduction order."""
  out = []
  for x in arrays:
    size = x.dtype.itemsize
    if size == 1:
      bits = x.astype(jnp.uint8).astype(jnp.uint32)
    elif size == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    out.append(jnp.sum(bits, dtype=jnp.uint32))
  return out


def fingerprint(state: Any) -> dict[str, int]:
  """{path: fingerprint} of every numeric array of `state`."""
  leaves = {k: v for k, v in _leaves(state).items()
            if isinstance(v, jax.Array) and not jax.dtypes.issubdtype(
                v.dtype, jax.dtypes.prng_key)}
  values = jax.device_get(_fingerprints(list(leaves.values())))
  return {k: int(v) for k, v in zip(leaves, values)}


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int):
    self.directory = pathlib.Path(directory).absolute()
    self.max_to_keep = max_to_keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep,
                                             create=True),
        item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator,
           meta: dict) -> None:
    meta = {**meta, "fingerprints": fingerprint(state)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)))

  def check_shapes(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatch naming the first array whose shape in the
    checkpoint differs from `abstract_state`'s (or that one lacks)."""
    metadata = ocp.StandardCheckpointHandler().metadata(
        self.directory / str(step) / "state")
    saved = getattr(metadata, "item_metadata", metadata)
    have = {k: tuple(v.shape) for k, v in _leaves(saved).items()
            if hasattr(v, "shape")}
    want = {k: tuple(v.shape) for k, v in _leaves(abstract_state).items()}
    for key in sorted(want):
      if key not in have:
        raise CheckpointMismatch(
            f"checkpoint {step}: this config's model has {_readable(key)} "
            f"{want[key]}, which the checkpoint lacks")
      if have[key] != want[key]:
        raise CheckpointMismatch(
            f"checkpoint {step}: {_readable(key)} has shape {have[key]} in the "
            f"checkpoint but {want[key]} in this config")
    extra = sorted(set(have) - set(want))
    if extra:
      raise CheckpointMismatch(
          f"checkpoint {step}: holds {_readable(extra[0])} {have[extra[0]]}, "
          "which this config's model lacks")

  def restore(self, step: int, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None,
              verify: bool = True) -> tuple[Any, dict]:
    """Restores `state` onto the shardings of `abstract_state` (a tree of
    jax.ShapeDtypeStruct) and verifies its fingerprints; moves `data_iter`
    to its saved position. With ``verify=False`` the fingerprints stay in
    the meta for :meth:`verify` (which every process must then call: it
    computes them over the global arrays)."""
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state, meta = restored["state"], dict(restored["meta"])
    if verify:
      self.verify(state, meta.pop("fingerprints", None))
    return state, meta

  @staticmethod
  def verify(state: Any, expected: dict[str, int] | None) -> None:
    """Raises IOError when an array of `state` differs from its saved
    fingerprint (`expected`; None: a checkpoint saved without them)."""
    if expected is not None:
      got = fingerprint(state)
      bad = sorted(k for k in expected if got.get(k) != expected[k])
      if bad:
        raise IOError(f"{len(bad)} array(s) differ from what was saved, "
                      f"first {bad[0]}")

  def restore_latest(self, abstract_state: Any,
                     data_iter: grain.DatasetIterator | None = None,
                     log: Callable[[str], None] = print
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores and
    verifies, or None if there is none; damaged ones are reported and moved
    aside. Shape mismatches raise CheckpointMismatch."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        self.check_shapes(step, abstract_state)
        state, meta = self.restore(step, abstract_state, data_iter)
        return step, state, meta
      except CheckpointMismatch:
        raise
      except Exception as e:  # noqa: BLE001 (anything unreadable falls back)
        where = self.quarantine(step)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log(f"checkpoint {step} is damaged ({type(e).__name__}: {reason[:200]}); "
            f"moved it to {where} and trying the one before")
    return None

  def quarantine(self, step: int) -> pathlib.Path:
    """Moves a step directory to <checkpoints>.unreadable/<step>-<time>."""
    dest = self.move_aside(step)
    self.reopen()
    return dest

  def move_aside(self, step: int) -> pathlib.Path:
    """The move of :meth:`quarantine` alone (by one process of several,
    after which every process calls :meth:`reopen`)."""
    dest_dir = self.directory.with_name(self.directory.name + ".unreadable")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(self.directory / str(step)), str(dest))
    return dest

  def reopen(self) -> None:
    """Re-reads the steps on disk (a step was moved aside)."""
    self._manager.close()
    self._manager = self._open()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
