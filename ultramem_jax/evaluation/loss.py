"""eval.py loss: held-out loss and perplexity of a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys


def add_parser(sub) -> None:
  p = sub.add_parser("loss", help="held-out loss of a checkpoint")
  p.add_argument("--run_dir", required=True, type=pathlib.Path)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("overrides", nargs="*", help="dotted.key=value")


def evaluate_loss(run_dir: pathlib.Path, step: int | None,
                  overrides: list[str]) -> dict:
  from ultramem_jax.data.pipeline import prepare_data  # noqa: PLC0415
  from ultramem_jax.evaluation.restore import restore_run  # noqa: PLC0415
  from ultramem_jax.parallel.mesh import batch_sharding, use_mesh  # noqa: PLC0415
  from ultramem_jax.training.evaluate import evaluate  # noqa: PLC0415
  from ultramem_jax.training.step import make_eval_step  # noqa: PLC0415

  run = restore_run(run_dir, step, overrides)
  cfg = run.cfg
  data = prepare_data(cfg.data, tokenizer=run.tokenizer)
  with use_mesh(run.mesh):
    loss, tokens = evaluate(make_eval_step(run.graphdef), run.state, data.val_rows,
                            cfg.data.batch_size, batch_sharding(run.mesh))
  return {"run_dir": str(run_dir), "step": run.step, "source": cfg.data.source,
          "val_loss": loss, "val_perplexity": math.exp(loss),
          "val_tokens": tokens,
          "val_unigram_entropy": data.val_unigram_entropy}


def write_report(run_dir: pathlib.Path, result: dict) -> pathlib.Path:
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


def run(args: argparse.Namespace) -> int:
  result = evaluate_loss(args.run_dir, args.step, args.overrides)
  path = write_report(args.run_dir, result)
  print(json.dumps(result, indent=2))
  print(f"written to {path}", file=sys.stderr)
  return 0
