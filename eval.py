"""Evaluate a trained run.

    python eval.py loss --run_dir runs/tiny_dense [--step N] [key=value ...]

`loss` restores a checkpoint of the run (the latest unless --step is given),
rebuilds the run's validation split with its saved config and tokenizer, and
reports the held-out loss and perplexity over every validation token, with
the unigram entropy of the same tokens for scale. The result is printed as
JSON and written to RUN/eval/loss_step<N>.json and .md. Overrides (e.g.
mesh.data=1) change the saved config for this evaluation only; keys that
change shapes or data are refused.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

from ultramem_jax.config import ConfigError, apply_overrides, from_dict
from ultramem_jax.data.corpora import DataError


def evaluate_loss(run_dir: pathlib.Path, step: int | None,
                  overrides: list[str]) -> dict:
  import yaml
  from ultramem_jax.data.pipeline import prepare_data
  from ultramem_jax.data.tokenizer import load_tokenizer
  from ultramem_jax.parallel.mesh import batch_sharding, make_mesh, use_mesh
  from ultramem_jax.training.checkpoint import Checkpointer, abstract_like
  from ultramem_jax.training.evaluate import evaluate
  from ultramem_jax.training.loop import FIXED_SECTIONS, RunPaths, latest_checkpoint_step
  from ultramem_jax.training.state import create_state
  from ultramem_jax.training.step import make_eval_step

  paths = RunPaths(run_dir)
  if not paths.config.exists():
    raise ConfigError(f"--run_dir: {str(run_dir)!r} has no {paths.config.name}; "
                      "expected the directory of a training run")
  saved = yaml.safe_load(paths.config.read_text())
  cfg, trained = from_dict(apply_overrides(saved, overrides)), from_dict(saved)
  for section in FIXED_SECTIONS:
    if getattr(cfg, section) != getattr(trained, section):
      raise ConfigError(f"overrides may not change the {section} section of a "
                        "trained run")
  latest = latest_checkpoint_step(run_dir)
  if latest is None:
    raise ConfigError(f"--run_dir: {str(run_dir)!r} holds no checkpoint")
  checkpointer = Checkpointer(paths.checkpoints, cfg.train.max_to_keep)
  steps = checkpointer.all_steps()
  if step is None:
    step = latest
  elif step not in steps:
    raise ConfigError(f"--step: got {step}; the run has checkpoints at steps {steps}")
  data = prepare_data(cfg.data, tokenizer=load_tokenizer(paths.tokenizer))
  mesh = make_mesh(cfg.mesh)
  with use_mesh(mesh):
    graphdef, state = create_state(cfg)
    checkpointer.check_shapes(step, abstract_like(state))
    state, _ = checkpointer.restore(step, abstract_like(state))
    loss, tokens = evaluate(make_eval_step(graphdef), state, data.val_rows,
                            cfg.data.batch_size, batch_sharding(mesh))
  checkpointer.close()
  return {"run_dir": str(run_dir), "step": step, "source": cfg.data.source,
          "val_loss": loss, "val_perplexity": math.exp(loss),
          "val_tokens": tokens,
          "val_unigram_entropy": data.val_unigram_entropy}


def _write_report(run_dir: pathlib.Path, result: dict) -> pathlib.Path:
  out = run_dir / "eval"
  out.mkdir(exist_ok=True)
  stem = out / f"loss_step{result['step']}"
  stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  stem.with_suffix(".md").write_text(
      "| source | step | val loss (nats/token) | perplexity | unigram entropy | tokens |\n"
      "|---|---|---|---|---|---|\n"
      f"| {result['source']} | {result['step']} | {result['val_loss']:.4f} | "
      f"{result['val_perplexity']:.2f} | {result['val_unigram_entropy']:.4f} | "
      f"{result['val_tokens']} |\n")
  return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  loss = sub.add_parser("loss", help="held-out loss of a checkpoint")
  loss.add_argument("--run_dir", required=True, type=pathlib.Path)
  loss.add_argument("--step", type=int, default=None)
  loss.add_argument("overrides", nargs="*", help="dotted.key=value")
  args = parser.parse_args(argv)
  try:
    result = evaluate_loss(args.run_dir, args.step, args.overrides)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  path = _write_report(args.run_dir, result)
  print(json.dumps(result, indent=2))
  print(f"written to {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
