"""Checks made before anything is built, compiled or written: that the run
directory can be written. (The mesh's checks are ``parallel/mesh.check_mesh``.)"""

from __future__ import annotations

import pathlib

from ultramem_jax.config import require_writable_dir


def check_writable(run_dir: pathlib.Path) -> None:
  """train.run_dir, or the nearest ancestor that exists, accepts new files."""
  require_writable_dir(run_dir, "train.run_dir")
