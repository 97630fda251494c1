"""The ``data`` section: the corpus, tokenizer, packing, batch and the task
mixture, with the rules they must satisfy. Checking ``data.tasks`` and
``data.task_params`` builds a few instances of each task (the task suite is
at this layer and imports only ConfigError from ``ultramem_jax.config``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from ultramem_jax.config import ConfigError, PathStr, require
from ultramem_jax.tasks import TASKS, TaskError, TokenSpace, get_task, parse_mixture


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes batches (``data``)."""

  # A corpus name (wiki, sotu, brown, pydoc) or a path to user text: a plain
  # text file (one document), a JSON-lines file or a directory of them
  # (a leading ~ is expanded, as for every path-valued key).
  source: PathStr = "wiki"
  # Where fetched corpora are cached; "" means $ULTRAMEM_DATA_DIR or
  # ~/.cache/ultramem_jax (never inside the repository). It must be a
  # directory that can be created and written when a corpus is fetched.
  data_dir: PathStr = ""
  text_field: str = "text"
  tokenizer: Literal["bpe", "bytes"] = "bpe"
  # Target size of the BPE vocabulary (special tokens included).
  bpe_vocab_size: int = 4096
  seq_len: int = 128
  # Global batch size in sequences (split over the data-parallel devices).
  batch_size: int = 32
  val_fraction: float = 0.05
  # Seeds the train/validation split by document and the packing order.
  split_seed: int = 0
  # Keep only the first N documents of the source (after a seeded shuffle);
  # 0 keeps all. Handy for quick experiments.
  max_documents: int = 0
  # A user file that is not valid UTF-8: "error" stops with the file and
  # byte offset; "skip" leaves the file out and reports how many were.
  on_decode_error: Literal["error", "skip"] = "error"
  # Training rows from the task suite (ultramem_jax/tasks): a mixture
  # "name:weight,..." of niah, mqar, mqar_overwrite, token_mapping and
  # fact_retrieval (an entry without a weight weighs 1), where the entry
  # "text" stands for packed rows of data.source. The weights are shares of
  # rows: "mqar" trains on MQAR alone, "mqar:1,text:3" makes a quarter of
  # the rows MQAR and the rest text. "" (the default) trains on text alone.
  # data.source is read either way: it gives the tokenizer and the needle
  # task's filler text (training text for training, validation text for
  # validation).
  tasks: str = ""
  # Which targets of a task row carry loss: "answers" (the answer tokens
  # only) or "all" (every token of the instance; never the padding). Text
  # rows carry loss on every token. The loss is the mean over the batch's
  # loss-carrying tokens, so with "answers" a task row weighs less than a
  # text row.
  task_loss: Literal["answers", "all"] = "answers"
  # Generator parameters per task, e.g. {mqar: {num_pairs: [4, 8]}} (a
  # list is an inclusive range drawn per instance; see each task's class
  # for its parameters and defaults, which fill data.seq_len). Also used by
  # eval.py tasks.
  task_params: dict[str, dict[str, Any]] = dataclasses.field(
      default_factory=dict)
  # Held-out task rows (split "eval") whose loss is val/task_loss at every
  # validation.
  task_val_rows: int = 256



def validate_data(d: DataConfig, vocab_size: int = 0) -> None:
  """Every rule of the ``data`` section; `vocab_size` is model.vocab_size
  (0: taken from the tokenizer), the token space the task check uses."""
  for key in ("seq_len", "batch_size"):
    require(getattr(d, key) > 0, f"data.{key}", getattr(d, key),
            "must be a positive integer")
  require(d.max_documents >= 0, "data.max_documents", d.max_documents,
          "must be >= 0 (0 means derived)")
  if d.tokenizer == "bpe":
    require(d.bpe_vocab_size >= 260, "data.bpe_vocab_size", d.bpe_vocab_size,
            "must be at least 260 (256 byte symbols plus merges)")
  require(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction,
          "must lie strictly between 0 and 1")
  _validate_tasks(d, vocab_size)


def _validate_tasks(d: DataConfig, vocab_size: int) -> None:
  """data.tasks and data.task_params: the mixture parses, every task and
  parameter exists, and a few instances of each task fit data.seq_len (in
  the token space of the vocabulary the run will most likely have; the
  data pipeline checks again with the real tokenizer)."""
  tasks = {}
  for name, params in d.task_params.items():
    if name not in TASKS:
      raise ConfigError(f"data.task_params.{name}: unknown task; known: "
                        f"{', '.join(TASKS)}")
    try:
      tasks[name] = get_task(name, **params)
    except TaskError as e:
      raise ConfigError(f"data.task_params.{e}") from None
  if not d.tasks:
    return
  weights = parse_mixture(d.tasks, "data.tasks", extra=("text",))
  names = [n for n in weights if n != "text"]
  require(bool(names), "data.tasks", d.tasks,
          "names no task; use data.tasks='' to train on text alone")
  require(d.task_val_rows > 0, "data.task_val_rows", d.task_val_rows,
          "must be a positive number of held-out task rows")
  if vocab_size:
    space = TokenSpace.for_vocab(vocab_size)
  elif d.tokenizer == "bytes":
    space = TokenSpace.for_vocab(257, exclude=(256,))
  else:
    space = TokenSpace.for_vocab(d.bpe_vocab_size)
  for name in names:
    task = tasks.get(name) or get_task(name)
    where = (f"data.task_params.{name}" if name in d.task_params
             else "data.tasks")
    for seed in range(4):
      try:
        task.generate(np.random.default_rng(seed), space, d.seq_len + 1)
      except (TaskError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{where}: task {name!r} cannot make rows of data.seq_len="
            f"{d.seq_len}: {e}; change data.seq_len or "
            f"data.task_params.{name}") from None
