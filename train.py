"""Train a model: python train.py --config configs/tiny_dense.yaml [key=value ...]

Exit status: 0 when training finished or was stopped by SIGTERM/SIGINT
(with a checkpoint saved; run the same command to resume), 2 for a bad
config or bad data (nothing was trained), 3 when training diverged.
"""

from __future__ import annotations

import argparse
import sys

from ultramem_jax.config import ConfigError, load_config
from ultramem_jax.data.corpora import DataError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__,
      epilog="Overrides are dotted config keys, e.g. optimizer.lr=1e-3 train.steps=200")
  parser.add_argument("--config", required=True, help="YAML config file")
  parser.add_argument("overrides", nargs="*", help="dotted.key=value")
  args = parser.parse_args(argv)
  try:
    cfg = load_config(args.config, args.overrides)
    # JAX is imported only after the config checks.
    from ultramem_jax.training.health import Diverged  # noqa: PLC0415
    from ultramem_jax.training.loop import train  # noqa: PLC0415
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    train(cfg)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
