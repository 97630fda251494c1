"""Checks made before anything is built, compiled or written: that the run
directory can be written. (The mesh's checks are ``parallel/mesh.check_mesh``.)"""

from __future__ import annotations

import pathlib
import tempfile

from ultramem_jax.config import ConfigError


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
