"""Train a model: python train.py --config configs/tiny_dense.yaml [key=value ...]"""

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
    from ultramem_jax.training.loop import train  # imports JAX: after the checks
    train(cfg)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
