"""Evaluate a trained run.

    python eval.py loss --run_dir runs/tiny_dense [--step N]
        [--corpora wiki,sotu,PATH] [--context 512] [--buckets pow2|WIDTH]
        [--position_corpora ...|none] [--all_documents] [--out DIR]
        [--no_progress] [key=value ...]
    python eval.py loss --config C --checkpoint RUN/checkpoints/N
        [--tokenizer RUN/tokenizer.json] [same options]

`loss` restores a checkpoint of the run (the latest unless --step is given)
and scores each corpus (default: the run's data.source) on the validation
documents that the run's split (data.val_fraction, data.split_seed) gives
it, tokenized with the run's tokenizer: loss, perplexity, tokens and unigram
entropy per corpus. It also reports the loss by position within documents
of at least --context tokens (default data.seq_len), in buckets of
positions. The result is printed as JSON and written to
RUN/eval/loss_step<N>.json and .md, with the loss by position as
loss_by_position_step<N>.png. Overrides (e.g. mesh.data=1) change the saved
config for this evaluation only; keys that change shapes or data are
refused.

    python eval.py generate --run_dir runs/tiny_dense --prompt "The" [--step N]
        [--prompt ...] [--prompt_file F] [--max_new_tokens 64]
        [--temperature 0] [--top_p 1] [--seed 0] [key=value ...]

`generate` restores a checkpoint the same way and continues each prompt:
the prompts in one prefill call that fills a key/value cache, then one
jitted decode step per token (greedy at temperature 0, else sampled, top-p
when --top_p < 1, reproducible for a --seed). It stops at --max_new_tokens
or once every prompt has produced the end-of-text token, prints the texts,
and reports tokens/s on stderr with a progress bar.

    python eval.py tasks --run_dir runs/tiny_mqar_moe [--step N]
        [--tasks mqar,niah,...] [--lengths 32,64] [--n 200] [--seed 0]
        [--params mqar.num_pairs=8 ...] [--out DIR] [--no_progress]
        [key=value ...]

`tasks` scores held-out instances of the task suite (default: the tasks of
the run's data.tasks, at data.seq_len and twice it): greedy predictions
with teacher forcing, exact match on the answer tokens only, accuracy by
length and by each task's buckets (needle depth, demonstrations, rounds,
fact form) beside the chance level. The result is written to
RUN/eval/tasks_step<N>.json and .md with PNG plots next to them.

    python eval.py cost --config configs/paper/moe_227m.yaml
        [--config ...] [--batch 1,8,64] [--no_xla] [--out PATH] [key=value ...]

`cost` prints, per config and batch size, the bytes a decode step reads by
the formula of spec section 7 (parameters touched + KV cache) and FLOPs,
beside XLA's cost_analysis() of the compiled decode step (lowered from
abstract shapes: nothing is allocated).

    python eval.py harness --run_dir runs/tiny_dense --tasks paper|NAME,...
        [--limit N] [--num_fewshot K] [--batch_size B] [--step N]
        [--include_path DIR] [--max_gen_toks 256] [--out DIR] [key=value ...]

`harness` scores the checkpoint on lm-evaluation-harness tasks (`paper`:
the nine tasks of the paper's Table 3; custom task YAMLs from
--include_path) and writes the harness's results JSON and a markdown table
(the paper's metric and its standard error per task) to
RUN/eval/harness_step<N>_<tasks>.json and .md.

eval.py runs as one process. A run trained by several processes
(train.py --coordinator/--distributed) is evaluated the same way: its
checkpoint re-shards onto this process's mesh (override mesh.* to fit the
devices here), and the per-process data positions are not read.

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

COMMANDS = ("loss", "generate", "cost", "tasks", "harness")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  argv = sys.argv[1:] if argv is None else list(argv)
  # Only the named subcommand's module is imported (harness brings in
  # lm-eval and datasets); without one, or for --help, all of them.
  chosen = [argv[0]] if argv and argv[0] in COMMANDS else COMMANDS
  modules = {name: importlib.import_module(f"ultramem_jax.evaluation.{name}")
             for name in chosen}
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
