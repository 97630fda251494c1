"""Activation rematerialisation of the blocks (``model.remat``).

Each block's forward pass runs under ``nnx.remat`` with one of
``jax.checkpoint_policies``, which decides which of its intermediate values
the backward pass keeps and which it recomputes from the block's input:

- ``none``: no remat; every intermediate the backward pass needs is kept;
- ``full``: nothing is saveable: only the block's input is kept, the whole
  block runs again in the backward pass;
- ``save_dots``: the outputs of matrix multiplications without batch
  dimensions are kept (``dots_with_no_batch_dims_saveable``); norms,
  activations, softmaxes and attention's batched score products are
  recomputed;
- ``save_dots_and_retrieval``: also the memory layer's top-k outputs, the
  retrieved slot indices and their scores, which the memory stages name
  with ``jax.ad_checkpoint.checkpoint_name`` (:func:`named_top_k`), so the
  backward pass does not redo the top-k over the keys and the K x K grid.

Remat changes what is stored, never what is computed: the loss and the
gradients are those of ``none`` (tests/test_remat.py), so a run may resume
with another policy (training/run_dir.py).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

# Names of the memory layer's retrieved indices and scores (stages.py).
RETRIEVED_INDICES = "memory_retrieved_indices"
RETRIEVED_SCORES = "memory_retrieved_scores"
RETRIEVAL_NAMES = (RETRIEVED_INDICES, RETRIEVED_SCORES)

_CP = jax.checkpoint_policies
POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": _CP.nothing_saveable,
    "save_dots": _CP.dots_with_no_batch_dims_saveable,
    "save_dots_and_retrieval": _CP.save_from_both_policies(
        _CP.dots_with_no_batch_dims_saveable,
        _CP.save_only_these_names(*RETRIEVAL_NAMES)),
}


def named_top_k(top_k: Callable) -> Callable:
  """`top_k` (x, k) -> (values, indices) with its outputs named for the
  ``save_dots_and_retrieval`` policy (names are no-ops outside remat)."""

  def wrapped(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    values, indices = top_k(x, k)
    return (checkpoint_name(values, RETRIEVED_SCORES),
            checkpoint_name(indices, RETRIEVED_INDICES))

  return wrapped


def name_retrieved(indices: jax.Array, scores: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """Names a fused top-k's outputs (the Pallas path) like :func:`named_top_k`."""
  return (checkpoint_name(indices, RETRIEVED_INDICES),
          checkpoint_name(scores, RETRIEVED_SCORES))


def remat(fn: Callable, policy: str) -> Callable:
  """`fn` (whose first argument is a module) under ``nnx.remat`` with the
  named ``model.remat`` policy; `fn` itself for ``none``."""
  if policy == "none":
    return fn
  return nnx.remat(fn, policy=POLICIES[policy], prevent_cse=True)
