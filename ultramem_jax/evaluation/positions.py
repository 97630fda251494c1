"""Loss by position within long documents.

A document of at least ``context`` tokens is scored on one window, its
start: the inputs are the document separator followed by the document's
first ``context - 1`` tokens, and the targets are its first ``context``
tokens. The target at position p (0-based) is thus predicted from the
separator and the p document tokens before it, as a document is entered in
training, where every document follows a separator. Shorter documents are
left out.

The per-position sums of token losses (nats) and token counts are then
summed into buckets of positions: powers of two (``[0, 1), [1, 2), [2, 4),
...``) or a fixed width. Positions at or beyond the trained sequence length
are scored all the same: rotary positions have no upper limit, so the model
is run there without clipping, but it has never been trained on them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultramem_jax.data.corpora import DataError
from ultramem_jax.data.pipeline import eval_batches
from ultramem_jax.parallel.distributed import batch_shard
from ultramem_jax.training.evaluate import shard_batch
from ultramem_jax.training.step import token_losses


def document_windows(token_docs: Sequence[np.ndarray], sep_id: int,
                     context: int, corpus: str) -> np.ndarray:
  """int32 [n, context + 1]: per document of at least `context` tokens, the
  separator followed by its first `context` tokens (inputs are ``[:, :-1]``,
  targets ``[:, 1:]``). Raises DataError naming `corpus` when no document
  is that long."""
  if context < 1:
    raise DataError(f"--context: got {context}; expected at least 1")
  long_docs = [np.asarray(d[:context], np.int32)
               for d in token_docs if len(d) >= context]
  if not long_docs:
    longest = max((len(d) for d in token_docs), default=0)
    raise DataError(
        f"corpus {corpus!r}: none of its {len(token_docs)} documents has at "
        f"least --context={context} tokens (the longest has {longest}); lower "
        "--context or leave this corpus out of the loss by position")
  sep = np.full((len(long_docs), 1), sep_id, np.int32)
  return np.concatenate([sep, np.stack(long_docs)], axis=1)


def make_position_step(graphdef: nnx.GraphDef) -> Callable:
  """(state, batch with 'weights') -> (per-position sum of weighted token
  losses [T], per-position sum of weights [T]), reduced over the batch."""

  def position_step(state: nnx.State, batch: dict):
    model, _ = nnx.merge(graphdef, state)
    losses = token_losses(model, batch)
    w = batch["weights"]
    return jnp.sum(losses * w, axis=0), jnp.sum(w, axis=0)

  return jax.jit(position_step)


def position_sums(position_step: Callable, state, windows: np.ndarray,
                  batch_size: int, sharding,
                  on_batch: Callable[[int], None] = lambda n: None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(loss sum, token count) per position, float64 [context], over every
  row of `windows`. Every process holds all rows and places its part of each
  batch; `on_batch` is told the number of real target tokens of each."""
  part, parts = batch_shard(sharding, batch_size)
  context = windows.shape[1] - 1
  sums, counts = np.zeros(context), np.zeros(context)
  for start, batch in zip(range(0, len(windows), batch_size),
                          eval_batches(windows, batch_size, 0, part, parts)):
    s, c = position_step(state, shard_batch(batch, sharding, batch_size))
    sums += np.asarray(s, np.float64)
    counts += np.asarray(c, np.float64)
    on_batch(min(batch_size, len(windows) - start) * context)
  return sums, counts


def bucket_edges(context: int, width: int | None = None) -> list[tuple[int, int]]:
  """[start, end) position buckets covering 0..context-1: powers of two
  (``[0, 1), [1, 2), [2, 4), ...``, the last cut at `context`) without a
  `width`, else consecutive buckets of `width` positions."""
  if width is not None:
    if width < 1:
      raise ValueError(f"bucket width must be at least 1, got {width}")
    return [(s, min(s + width, context)) for s in range(0, context, width)]
  edges, start, end = [], 0, 1
  while start < context:
    edges.append((start, min(end, context)))
    start, end = end, 2 * end
  return edges


def bucket_stats(sums: np.ndarray, counts: np.ndarray,
                 edges: Sequence[tuple[int, int]]) -> list[dict]:
  """Per bucket: start, end (exclusive), mean loss over its tokens (nan
  when it has none) and the number of tokens."""
  out = []
  for start, end in edges:
    n = float(np.sum(counts[start:end]))
    total = float(np.sum(sums[start:end]))
    out.append({"start": int(start), "end": int(end),
                "loss": total / n if n else float("nan"), "tokens": int(n)})
  return out


def early_late(sums: np.ndarray, counts: np.ndarray) -> dict:
  """Mean loss over the first and the last quarter of the positions and
  their difference (late minus early; negative when later tokens, with
  more of the document before them, are predicted better)."""
  context = len(sums)
  quarter = max(1, context // 4)
  early = slice(0, quarter)
  late = slice(context - quarter, context)
  e = float(np.sum(sums[early]) / np.sum(counts[early]))
  l = float(np.sum(sums[late]) / np.sum(counts[late]))  # noqa: E741
  return {"early_positions": [0, quarter], "early_loss": e,
          "late_positions": [context - quarter, context], "late_loss": l,
          "late_minus_early": l - e}
