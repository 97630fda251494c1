"""eval.py loss: held-out loss per corpus and loss by position in documents.

What is evaluated: a run directory (``--run_dir``, checkpoint ``--step`` or
the latest), or a config file with a checkpoint step directory (``--config
C --checkpoint RUN/checkpoints/N``; the tokenizer is the config's
``train.run_dir/tokenizer.json`` unless ``--tokenizer`` names one).

Corpora (``--corpora``, default the run's ``data.source``) are corpus names
or paths to the user's text (see ``evaluation/held_out.py``). Each is read,
split and tokenized as the training pipeline would for
``data.source=<corpus>`` with the run's ``data`` settings
(``max_documents``, ``val_fraction``, ``split_seed``) and the run's
tokenizer, and only its validation documents are scored: for the
run's own source these are exactly its validation rows, and a corpus the
model was trained on is still scored on documents it has not seen. With
``--all_documents`` the corpora other than the run's source are scored on
all their documents. Per corpus: loss (nats/token) and perplexity over the
validation documents packed as in training (rows of ``data.seq_len``), the
number of target tokens, and the unigram entropy of those tokens for scale.

Loss by position (see ``evaluation/positions.py``): the start window of
every scored document of at least ``--context`` tokens (default
``data.seq_len``), bucketed by position, for the ``--position_corpora``
(default: all). A corpus with no such document is an error naming it,
except in the default invocation (neither ``--context`` nor
``--position_corpora`` given), where it is left out with a note.

Written to ``OUT/loss_step<N>.json``, ``.md`` and, with positions,
``loss_by_position_step<N>.png`` (``evaluation/loss_report.py``); OUT is
``--out``, else ``RUN/eval``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys

import jax
import numpy as np
from tqdm.auto import tqdm

from ultramem_jax.config import ConfigError
from ultramem_jax.data.corpora import CORPORA, DataError
from ultramem_jax.data.packing import unigram_entropy
from ultramem_jax.data.tokenizer import load_tokenizer
from ultramem_jax.evaluation import positions as pos
from ultramem_jax.evaluation.held_out import Corpus, load_corpus, packed_rows
from ultramem_jax.evaluation.loss_report import write_report
from ultramem_jax.evaluation.restore import (RestoredRun, check_out_dir,
                                             load_run_config, restore_run,
                                             restore_state)
from ultramem_jax.parallel.mesh import batch_sharding, use_mesh
from ultramem_jax.parallel.rules import batch_shards
from ultramem_jax.training.config import from_dict, load_config
from ultramem_jax.training.evaluate import evaluate
from ultramem_jax.training.run_dir import RunDir, is_checkpoint_step, model_data_difference
from ultramem_jax.training.step import make_eval_step


def add_parser(sub) -> None:
  p = sub.add_parser(
      "loss", help="held-out loss per corpus and loss by position",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run_dir", type=pathlib.Path, default=None,
                 help="a training run's directory")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step of --run_dir (default: the latest)")
  p.add_argument("--config", type=pathlib.Path, default=None,
                 help="instead of --run_dir: the run's config file ...")
  p.add_argument("--checkpoint", type=pathlib.Path, default=None,
                 help="... and a checkpoint step directory, e.g. RUN/checkpoints/300")
  p.add_argument("--tokenizer", type=pathlib.Path, default=None,
                 help="with --config: tokenizer.json (default: the config's "
                      "train.run_dir/tokenizer.json)")
  p.add_argument("--corpora", default=None,
                 help="comma-separated corpus names (" + ", ".join(CORPORA) +
                      ") or paths (default: the run's data.source)")
  p.add_argument("--position_corpora", default=None,
                 help="the corpora of --corpora that get the loss by position "
                      "(default: all of them; 'none' for none). A corpus "
                      "without a document of --context tokens is an error, "
                      "unless both options are left at their defaults: then "
                      "it is skipped with a note")
  p.add_argument("--context", type=int, default=None,
                 help="positions per document window (default: data.seq_len; "
                      "larger values run the model beyond its trained length)")
  p.add_argument("--buckets", default="pow2",
                 help="'pow2' (positions [0,1), [1,2), [2,4), ...) or a bucket "
                      "width in positions")
  p.add_argument("--all_documents", action="store_true",
                 help="score corpora other than the run's source on all their "
                      "documents, not only their validation split")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="output directory (default: RUN/eval)")
  p.add_argument("--no_progress", action="store_true",
                 help="no progress bars")
  p.add_argument("overrides", nargs="*", help="dotted.key=value")


# ----------------------------------------------------------------------------- arguments


def parse_corpora(text: str, flag: str = "--corpora") -> list[str]:
  """Comma-separated corpus names or existing paths; DataError for others."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise DataError(f"{flag}: got {text!r}; expected comma-separated corpus "
                    f"names ({', '.join(CORPORA)}) or paths")
  for name in names:
    if name not in CORPORA and not pathlib.Path(name).expanduser().exists():
      raise DataError(f"{flag}: {name!r} is neither a corpus name "
                      f"({', '.join(CORPORA)}) nor an existing file or directory")
  if len(set(names)) != len(names):
    raise DataError(f"{flag}: got {text!r}; a corpus is named twice")
  return names


def parse_buckets(text: str) -> int | None:
  """None for powers of two, else the bucket width."""
  if text == "pow2":
    return None
  try:
    width = int(text)
  except ValueError:
    width = 0
  if width < 1:
    raise ConfigError(f"--buckets: got {text!r}; expected 'pow2' or a "
                      "positive bucket width")
  return width


# ----------------------------------------------------------------------------- restoring

def restore_checkpoint(config: pathlib.Path, checkpoint: pathlib.Path,
                       tokenizer: pathlib.Path | None, overrides: list[str]
                       ) -> RestoredRun:
  """A RestoredRun from a config file and a checkpoint step directory
  (``.../checkpoints/<step>``). The config must describe the model and data
  the checkpoint was trained with (as saved in the checkpoint; the rule of
  ``run_dir.model_data_difference``)."""
  cfg = load_config(config, overrides)
  checkpoint = checkpoint.expanduser().absolute()
  if not is_checkpoint_step(checkpoint):
    raise ConfigError(f"--checkpoint: {str(checkpoint)!r} is not a checkpoint "
                      "step directory (expected RUN/checkpoints/<step>)")
  tok_path = tokenizer or RunDir(cfg.train.run_dir).tokenizer
  if not tok_path.is_file():
    raise ConfigError(f"--tokenizer: {str(tok_path)!r} does not exist; pass "
                      "the run's tokenizer.json with --tokenizer")
  tok = load_tokenizer(tok_path)
  if cfg.model.vocab_size == 0:
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=tok.vocab_size))
  step = int(checkpoint.name)
  mesh, graphdef, state, meta = restore_state(cfg, checkpoint.parent, step)
  if "config" in meta:
    diff = model_data_difference(from_dict(meta["config"]), cfg)
    if diff:
      name, a, b = diff
      raise ConfigError(f"--config: {name}: the checkpoint was trained with "
                        f"{a!r}, --config has {b!r}")
  return RestoredRun(cfg, step, mesh, graphdef, state, tok)


# ----------------------------------------------------------------------------- evaluation

def _bar(total: int, desc: str, enabled: bool):
  return tqdm(total=total, desc=desc, unit="tok", unit_scale=True,
              dynamic_ncols=True, mininterval=1.0, leave=False,
              disable=not enabled or jax.process_index() != 0)


def corpus_loss(eval_step, state, rows: np.ndarray, batch_size: int, sharding,
                bar) -> tuple[float, int]:
  """(mean loss, target tokens) over `rows`, one batch at a time so that
  `bar` advances."""
  total, count = 0.0, 0
  for start in range(0, len(rows), batch_size):
    loss, n = evaluate(eval_step, state, rows[start:start + batch_size],
                       batch_size, sharding)
    total += loss * n
    count += n
    bar.update(n)
  return total / count, count


def position_batch_size(batch_size: int, seq_len: int, context: int,
                        mesh) -> int:
  """Rows per batch for windows of `context` tokens: about the tokens of a
  training batch, a multiple of the mesh's batch shards."""
  shards = batch_shards(mesh.shape)
  rows = batch_size * seq_len // context // shards * shards
  return max(shards, rows)


def _windows(loaded: dict[str, Corpus], position_corpora: list[str], sep_id: int,
             context: int, skip_short: bool) -> tuple[dict, dict]:
  """({corpus: document windows}, {corpus left out: why})."""
  windows, skipped = {}, {}
  for name in position_corpora:
    try:
      windows[name] = pos.document_windows(loaded[name].token_docs, sep_id,
                                           context, name)
    except DataError as e:
      if not skip_short:
        raise
      skipped[name] = str(e)
  return windows, skipped


def _corpus_scores(run: RestoredRun, eval_step, loaded: dict[str, Corpus],
                   rows: dict[str, np.ndarray], sharding, progress: bool) -> dict:
  """{corpus: loss, perplexity, tokens, unigram entropy, documents}."""
  seq_len, batch_size = run.cfg.data.seq_len, run.cfg.data.batch_size
  scores = {}
  for name, c in loaded.items():
    r = rows[name]
    with _bar(len(r) * seq_len, f"loss {name}", progress) as bar:
      loss, tokens = corpus_loss(eval_step, run.state, r, batch_size, sharding, bar)
    scores[name] = {
        "loss": loss, "perplexity": math.exp(loss), "tokens": tokens,
        "unigram_entropy": unigram_entropy(r[:, 1:]),
        "documents": len(c.token_docs), "selection": c.selection,
        "trained_on": c.trained_on}
  return scores


def _position_scores(run: RestoredRun, windows: dict[str, np.ndarray],
                     loaded: dict[str, Corpus], context: int,
                     bucket_width: int | None, edges: list[tuple[int, int]],
                     sharding, progress: bool) -> dict:
  """The "positions" part of the report: loss by position per corpus, in
  the buckets `edges` (of `bucket_width`)."""
  seq_len = run.cfg.data.seq_len
  position_step = pos.make_position_step(run.graphdef)
  rows_per_batch = position_batch_size(run.cfg.data.batch_size, seq_len, context,
                                       run.mesh)
  by_corpus = {}
  for name, w in windows.items():
    with _bar(len(w) * context, f"positions {name}", progress) as bar:
      sums, counts = pos.position_sums(position_step, run.state, w,
                                       rows_per_batch, sharding, bar.update)
    by_corpus[name] = {
        "documents": len(w),
        "documents_too_short": len(loaded[name].token_docs) - len(w),
        **pos.early_late(sums, counts),
        "buckets": pos.bucket_stats(sums, counts, edges)}
  return {
      "context": context, "trained_seq_len": seq_len,
      "beyond_trained_length": context > seq_len,
      "buckets": "pow2" if bucket_width is None else f"width {bucket_width}",
      "window": ("per document of at least `context` tokens: the separator "
                 "and its first context-1 tokens as inputs, its first "
                 "`context` tokens as targets; position p has p document "
                 "tokens before it"),
      "corpora": by_corpus}


def evaluate_loss(run: RestoredRun, corpora: list[str], position_corpora: list[str],
                  context: int, bucket_width: int | None,
                  all_documents: bool = False, progress: bool = True,
                  skip_short: bool = False) -> dict:
  """The report for a RestoredRun `run`: loss per corpus and, for
  `position_corpora`, loss by position over windows of `context`. A
  position corpus without a document of `context` tokens raises DataError,
  or with `skip_short` is left out and named under "positions_skipped"."""
  cfg, tok = run.cfg, run.tokenizer
  # Everything is read and checked before anything is evaluated.
  loaded = {name: load_corpus(name, cfg.data, tok, all_documents) for name in corpora}
  rows = {name: packed_rows(c, tok.sep_id, cfg.data.seq_len)
          for name, c in loaded.items()}
  windows, skipped = _windows(loaded, position_corpora, tok.sep_id, context,
                              skip_short)
  edges = pos.bucket_edges(context, bucket_width)

  result = {"step": run.step, "trained_source": cfg.data.source,
            "seq_len": cfg.data.seq_len, "corpora": {}}
  sharding = batch_sharding(run.mesh)
  with use_mesh(run.mesh):
    eval_step = make_eval_step(run.graphdef)
    result["corpora"] = _corpus_scores(run, eval_step, loaded, rows, sharding,
                                       progress)
    if windows:
      result["positions"] = _position_scores(run, windows, loaded, context,
                                             bucket_width, edges, sharding,
                                             progress)
  if skipped:
    result["positions_skipped"] = skipped
  # The run's own validation split also under the keys of the first version.
  for name, c in loaded.items():
    if c.trained_on:
      r = result["corpora"][name]
      result.update(val_loss=r["loss"], val_perplexity=r["perplexity"],
                    val_tokens=r["tokens"], val_unigram_entropy=r["unigram_entropy"])
      break
  return result


# ----------------------------------------------------------------------------- command

def _check_args(args: argparse.Namespace) -> bool:
  """Whether the checkpoint is named by --config and --checkpoint (else
  --run_dir); ConfigError for options that do not go together."""
  by_config = args.config is not None or args.checkpoint is not None
  if by_config == (args.run_dir is not None):
    raise ConfigError("give either --run_dir, or --config with --checkpoint")
  if by_config and (args.config is None or args.checkpoint is None):
    raise ConfigError("--config and --checkpoint go together")
  if by_config and args.step is not None:
    raise ConfigError("--step goes with --run_dir; with --config, --checkpoint "
                      "names the step directory")
  if not by_config and args.tokenizer is not None:
    raise ConfigError("--tokenizer goes with --config; a run directory has its own")
  return by_config


def _position_corpora(args: argparse.Namespace, corpora: list[str]) -> list[str]:
  if args.position_corpora is None:
    return corpora  # those too short are skipped unless asked for
  if args.position_corpora == "none":
    return []
  position_corpora = parse_corpora(args.position_corpora, "--position_corpora")
  extra = [n for n in position_corpora if n not in corpora]
  if extra:
    raise DataError(f"--position_corpora: {extra[0]!r} is not one of "
                    f"--corpora ({', '.join(corpora)})")
  return position_corpora


def run(args: argparse.Namespace) -> int:
  by_config = _check_args(args)
  corpora = parse_corpora(args.corpora) if args.corpora is not None else None
  bucket_width = parse_buckets(args.buckets)
  if args.context is not None and args.context < 1:
    raise ConfigError(f"--context: got {args.context}; expected at least 1")
  if not by_config:
    load_run_config(args.run_dir, args.overrides)  # a bad directory fails fast
  # Where the report goes is checked before anything is evaluated.
  if args.out is not None or not by_config:
    check_out_dir(args.out, args.run_dir)

  if by_config:
    run_ = restore_checkpoint(args.config, args.checkpoint, args.tokenizer,
                              args.overrides)
    where = {"run_dir": None, "checkpoint": str(args.checkpoint)}
    out = pathlib.Path(run_.cfg.train.run_dir) / "eval"
    if args.out is None:
      check_out_dir(None, out.parent)
  else:
    run_ = restore_run(args.run_dir, args.step, args.overrides)
    where = {"run_dir": str(args.run_dir),
             "checkpoint": str(RunDir(args.run_dir).checkpoint(run_.step))}
    out = args.run_dir / "eval"
  corpora = corpora or [run_.cfg.data.source]
  position_corpora = _position_corpora(args, corpora)
  context = args.context or run_.cfg.data.seq_len

  result = evaluate_loss(run_, corpora, position_corpora, context, bucket_width,
                         args.all_documents, not args.no_progress,
                         skip_short=args.position_corpora is None
                         and args.context is None)
  result = {**where, **result}
  if jax.process_index() == 0:
    written = write_report(args.out or out, result)
    print(json.dumps(result, indent=2))
    print("written: " + ", ".join(map(str, written)), file=sys.stderr)
  return 0
