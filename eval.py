"""Evaluate a trained run.

    python eval.py loss --run_dir runs/tiny_dense [--step N] [key=value ...]

`loss` restores a checkpoint of the run (the latest unless --step is given),
rebuilds the run's validation split with its saved config and tokenizer, and
reports the held-out loss and perplexity over every validation token, with
the unigram entropy of the same tokens for scale. The result is printed as
JSON and written to RUN/eval/loss_step<N>.json and .md. Overrides (e.g.
mesh.data=1) change the saved config for this evaluation only; keys that
change shapes or data are refused.

Each subcommand lives in ultramem_jax/evaluation/<name>.py with
``add_parser(subparsers)`` and ``run(args) -> exit status``.

Exit status: 0 on success, 2 for bad arguments, config or data.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ultramem_jax.config import ConfigError
from ultramem_jax.data.corpora import DataError

COMMANDS = ("loss",)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  modules = {name: importlib.import_module(f"ultramem_jax.evaluation.{name}")
             for name in COMMANDS}
  for module in modules.values():
    module.add_parser(sub)
  args = parser.parse_args(argv)
  try:
    return modules[args.command].run(args)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
