"""Batched log-likelihoods of continuations, as lm-evaluation-harness asks.

A request is a pair of token lists (context, continuation). The model reads
``context + continuation`` minus its last token and predicts every token
after the first; the continuation's log-likelihood is the sum of the
log-probabilities of its own tokens, and it is greedy when each of them is
the argmax of its position. A pair longer than the model's window of W
tokens plus one keeps its last W + 1 tokens (truncated from the left, as
the harness's own models do); a continuation longer than W is refused.

Batching, as the harness's Hugging Face model batches: requests are sorted
by length, longest first (ties by tokens, so the order is a function of
the requests alone), and cut into batches of ``batch_size`` rows; requests
with the same inputs (one-token answers to one question) share a row. A batch
is right-padded to a bucket length, the next power of two (at least
``MIN_BUCKET``) or W, and filled up to ``batch_size`` rows with padding
rows, so the forward compiles once per bucket. Attention is causal and
the FFN, MoE (dropless) and memory layers act on each token alone, so
padding changes no real token's logits: a request's result depends on
neither the batch it lands in nor the order of the requests.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

MIN_BUCKET = 16

Request = tuple[Sequence[int], Sequence[int]]   # (context, continuation) ids


def bucket_length(n: int, window: int) -> int:
  """The padded length of a batch whose longest input has `n` tokens: the
  least power of two >= n (at least MIN_BUCKET), capped at `window`."""
  if n > window:
    raise ValueError(f"{n} tokens exceed the window of {window}")
  length = MIN_BUCKET
  while length < n:
    length *= 2
  return min(length, window)


def window_tokens(context: Sequence[int], continuation: Sequence[int],
                  window: int) -> tuple[list[int], int]:
  """(the tokens the model sees and scores, at most window + 1 of them,
  the continuation's length): ``context + continuation`` truncated from the
  left. Raises ValueError for an empty context or continuation or a
  continuation longer than `window`."""
  if not context or not continuation:
    raise ValueError("a request needs at least one context token (the "
                     "separator) and one continuation token")
  if len(continuation) > window:
    raise ValueError(f"a continuation of {len(continuation)} tokens is longer "
                     f"than the model's window of {window} (data.seq_len)")
  full = list(context) + list(continuation)
  return full[-(window + 1):], len(continuation)


def rolling_requests(tokens: Sequence[int], prefix: int, window: int
                     ) -> list[Request]:
  """A document as disjoint (context, continuation) windows (the harness's
  ``get_rolling_token_windows`` with one token of context, then
  ``make_disjoint_window``): the first window predicts the first W tokens
  after `prefix`, each later one the next W with the W tokens before them
  as context, and the last the rest with a full window of context. Every
  token is predicted exactly once."""
  return [make_disjoint_window(w) for w in get_rolling_token_windows(
      token_list=list(tokens), prefix_token=prefix, max_seq_len=window,
      context_len=1)]


@functools.partial(jax.jit, static_argnums=0)
def target_logprobs(graphdef: nnx.GraphDef, params: nnx.State,
                    inputs: jax.Array, targets: jax.Array, last: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The model (``nnx.split`` of a Transformer) reading `inputs` [B, T]:
  (log p(target) [B, T] float32, target == argmax [B, T], the whole
  log-softmax at position last[b] of each row [B, V])."""
  logits = nnx.merge(graphdef, params)(inputs).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  at_last = logp[jnp.arange(logp.shape[0]), last]
  return picked, jnp.argmax(logits, axis=-1) == targets, at_last


class Scorer:
  """The model, its window and a batch shape: scores lists of requests.

  graphdef, params: the model alone (``nnx.split(model)``); call inside its
  mesh (``use_mesh``). `batch_size` rows per forward, rounded up to a
  multiple of `row_multiple` (the mesh's batch shards); `pad_id` fills the
  padding.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, window: int,
               batch_size: int, pad_id: int, row_multiple: int = 1):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.graphdef, self.params = graphdef, params
    self.window, self.pad_id = window, pad_id
    self.rows = -(-batch_size // row_multiple) * row_multiple
    self.shapes: set[tuple[int, int]] = set()   # compiled (rows, length)
    self.forwarded = 0                          # rows run (requests share)

  def score(self, requests: Sequence[Request],
            on_batch: Callable[[int], None] = lambda n: None
            ) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) per request, in the order given;
    `on_batch` is told how many requests each batch finished. Requests
    whose inputs (every token but the last) are equal, such as the
    one-token answers "A", "B", "C", "D" after one question, share a row:
    they differ only in the last target, read off that row's last
    log-softmax."""
    seqs = [window_tokens(c, x, self.window) for c, x in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (s, _) in enumerate(seqs):
      groups.setdefault(tuple(s[:-1]), []).append(i)
    keys = sorted(groups, key=lambda k: (-len(k), k))   # longest first
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    for start in range(0, len(keys), self.rows):
      chunk = keys[start:start + self.rows]
      for key, (logp, greedy, last) in zip(chunk, self._batch(chunk)):
        for i in groups[key]:
          s, n_cont = seqs[i]
          end = len(key)   # the last target's position
          out[i] = (float(logp[end - n_cont:end - 1].sum() + last[s[-1]]),
                    bool(greedy[end - n_cont:end - 1].all()
                         and int(np.argmax(last)) == s[-1]))
      on_batch(sum(len(groups[k]) for k in chunk))
    self.forwarded += len(keys)
    return out  # type: ignore[return-value]

  def _batch(self, chunk: list[tuple[int, ...]]) -> list[tuple]:
    """Per row of inputs: (log p of each next input token, whether it is
    the argmax, the log-softmax after the last input)."""
    length = bucket_length(max(map(len, chunk)), self.window)
    inputs = np.full((self.rows, length), self.pad_id, np.int32)
    targets = np.full((self.rows, length), self.pad_id, np.int32)
    last = np.zeros(self.rows, np.int32)
    for r, row in enumerate(chunk):
      inputs[r, :len(row)] = row
      targets[r, :len(row) - 1] = row[1:]
      last[r] = len(row) - 1
    self.shapes.add((self.rows, length))
    logp, greedy, at_last = target_logprobs(
        self.graphdef, self.params, jnp.asarray(inputs), jnp.asarray(targets),
        jnp.asarray(last))
    logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
    at_last = np.asarray(at_last, np.float64)
    return [(logp[r], greedy[r], at_last[r]) for r in range(len(chunk))]
