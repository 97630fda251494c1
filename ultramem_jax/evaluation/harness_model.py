"""Our models inside lm-evaluation-harness: an ``lm_eval.api.model.LM``.

:class:`UltraMemLM` answers the harness's three request types for a
trained run (any model kind: dense, MoE, every memory variant), with the
run's tokenizer and the window it trained on (``data.seq_len``):

- ``loglikelihood(context, continuation)``: (log p(continuation | context),
  whether greedy decoding would produce it), batched by
  ``evaluation/harness_scoring.py`` (sorted by length, one compiled shape
  per power-of-two bucket, contexts truncated from the left).
- ``loglikelihood_rolling(text)``: the log-likelihood of a whole document
  over disjoint windows of the model's length, each token predicted once.
- ``generate_until(context, gen_kwargs)``: greedy continuation (or sampled,
  when the task asks for ``do_sample``) through the key/value-cache decode
  of ``evaluation/generate.py``, up to ``max_gen_toks`` tokens or the
  separator, cut at the first of the task's stop sequences (``until``).

Every text is read as a document is in training: after the separator
``<|endoftext|>``. As the harness's own models do, the trailing spaces of
a context move to its continuation, and the continuation's tokens are the
tokens of ``context + continuation`` after those of the context.

Registered with the harness as ``ultramem_jax``: importing this module
makes ``lm_eval.simple_evaluate(model="ultramem_jax",
model_args="run_dir=RUN")`` work. lm-eval 0.4.13 has no plugin mechanism
for models (its registry holds only its own ``MODEL_MAPPING``), so its
``lm_eval`` command cannot find the model; :func:`lm_eval_main` is that
command with the model registered, installed as ``ultramem-lm-eval``.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's own models stay registered)
import numpy as np
from flax import nnx
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import simple_parse_args_string
from tqdm.auto import tqdm

from ultramem_jax.config import ConfigError
from ultramem_jax.evaluation.generate import Sampler, model_only
from ultramem_jax.evaluation.harness_scoring import Scorer, rolling_requests
from ultramem_jax.evaluation.restore import restore_run
from ultramem_jax.parallel.mesh import use_mesh
from ultramem_jax.parallel.tokens import token_shards
from ultramem_jax.training.config import Config

MODEL_NAME = "ultramem_jax"
MODEL_ARGS = ("run_dir", "step", "batch_size", "max_gen_toks", "progress",
              "overrides")


class UltraMemLM(LM):
  """A model (``nnx.split`` of a Transformer), its run's config and
  tokenizer, and the mesh its parameters live on. ``batch_size`` rows per
  forward (rounded up to the mesh's batch shards); ``max_gen_toks`` is the
  default generation length when a task gives none."""

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, cfg: Config,
               tokenizer: Any, mesh: Any, *, batch_size: int = 8,
               max_gen_toks: int = 256, progress: bool = True,
               info: dict | None = None):
    super().__init__()
    if max_gen_toks < 1:
      raise ConfigError(f"max_gen_toks: got {max_gen_toks}; must be >= 1")
    self.graphdef, self.params, self.cfg = graphdef, params, cfg
    self.tok, self.mesh = tokenizer, mesh
    self.sep = int(tokenizer.sep_id)
    self.window = int(cfg.data.seq_len)
    self.max_gen_toks, self.progress = int(max_gen_toks), bool(progress)
    self.scorer = Scorer(graphdef, params, self.window, batch_size,
                         pad_id=self.sep, row_multiple=token_shards(mesh))
    self.info = dict(info or {})
    moe = cfg.model.ffn.moe
    if cfg.model.ffn.kind == "moe" and moe.capacity_factor > 0:
      print(f"note: model.ffn.moe.capacity_factor={moe.capacity_factor}: "
            "tokens of a batch compete for expert capacity, so scores depend "
            "on the batch (dropless routing, capacity_factor 0, does not)",
            file=sys.stderr)

  # ------------------------------------------------------------ building

  @classmethod
  def from_run(cls, run_dir: str | pathlib.Path, step: int | None = None,
               overrides: list[str] | tuple[str, ...] = (), **options
               ) -> "UltraMemLM":
    """The model of checkpoint `step` (the latest when None) of a run
    directory, restored as ``eval.py`` restores it (``restore_run``)."""
    run_dir = pathlib.Path(run_dir)
    restored = restore_run(run_dir, step, list(overrides))
    with use_mesh(restored.mesh):
      graphdef, params = model_only(restored.graphdef, restored.state)
    info = {"run_dir": str(run_dir), "step": restored.step,
            "model_kind": restored.cfg.model.ffn.kind,
            "memory_layers": restored.cfg.model.memory.layers,
            "window": restored.cfg.data.seq_len}
    return cls(graphdef, params, restored.cfg, restored.tokenizer,
               restored.mesh, info=info, **options)

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: dict | None = None
                             ) -> "UltraMemLM":
    """From ``--model_args run_dir=RUN,step=300,batch_size=16`` (the
    harness's command line); ``overrides`` takes ``;``-separated
    ``key=value`` pairs."""
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string),
                                   additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict,
                          additional_config: dict | None = None
                          ) -> "UltraMemLM":
    args = dict(arg_dict)
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
      raise ConfigError(f"--model_args: unknown key {unknown[0]!r}; "
                        f"{MODEL_NAME} takes {', '.join(MODEL_ARGS)}")
    if "run_dir" not in args:
      raise ConfigError(f"--model_args: {MODEL_NAME} needs run_dir=RUN")
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    batch = args.pop("batch_size", extra.get("batch_size", 8))
    overrides = [o for o in str(args.pop("overrides", "")).split(";") if o]
    return cls.from_run(overrides=overrides, batch_size=_batch_size(batch),
                        **args)

  # ------------------------------------------------------------ properties

  @property
  def max_length(self) -> int:
    return self.window

  @property
  def eot_token_id(self) -> int:
    return self.sep

  @property
  def tokenizer_name(self) -> str:
    return f"{MODEL_NAME}:{self.info.get('run_dir', 'model')}"

  def get_model_info(self) -> dict:
    """Added to the results' "config" by the harness."""
    return {"ultramem_jax": self.info, "max_length": self.window,
            "batch_rows": self.scorer.rows}

  # ------------------------------------------------------------ encoding

  def encode(self, text: str) -> list[int]:
    return self.tok.encode_batch([text])[0].tolist() if text else []

  def encode_pair(self, context: str, continuation: str
                  ) -> tuple[list[int], list[int]]:
    """(separator + context tokens, continuation tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = self.encode(context)
    cont = self.encode(context + continuation)[len(ctx):]
    if not cont:   # the tokenizer merged the continuation into the context
      cont = self.encode(continuation)
    return [self.sep] + ctx, cont

  # ------------------------------------------------------------ requests

  def _bar(self, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True,
                mininterval=1.0, disable=not self.progress)

  def _score(self, requests, desc: str) -> list[tuple[float, bool]]:
    with self._bar(len(requests), desc) as bar, use_mesh(self.mesh):
      return self.scorer.score(requests, bar.update)

  def loglikelihood(self, requests, disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    pairs = [self.encode_pair(*r.args) for r in requests]
    return self._score(pairs, "loglikelihood")

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                            ) -> list[float]:
    windows, owner = [], []
    for i, r in enumerate(requests):
      for w in rolling_requests(self.encode(r.args[0]), self.sep, self.window):
        windows.append(w)
        owner.append(i)
    totals = np.zeros(len(requests))
    for i, (logp, _) in zip(owner, self._score(windows, "loglikelihood_rolling")):
      totals[i] += logp
    return [float(t) for t in totals]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Requests grouped by their generation settings, each group sorted by
    prompt length (longest first) and generated in batches."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str),
                        []).append(i)
    out: list[str] = [""] * len(requests)
    with self._bar(len(requests), "generate_until") as bar, use_mesh(self.mesh):
      for indices in groups.values():
        texts = self._generate([requests[i].args[0] for i in indices],
                               requests[indices[0]].args[1], bar.update)
        for i, text in zip(indices, texts):
          out[i] = text
    return out

  def _generate(self, contexts: list[str], gen_kwargs: dict, on_batch
                ) -> list[str]:
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = [s for s in kwargs["until"] if s]
    new = int(kwargs["max_gen_toks"])
    sample = bool(kwargs.get("do_sample")) and float(kwargs["temperature"]) > 0
    sampler = Sampler(self.graphdef, self.params, self.cfg.model,
                      temperature=float(kwargs["temperature"]) if sample else 0.0,
                      top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0)
    # Room for the new tokens inside the window when there is any; a longer
    # generation runs past the trained length, as eval.py generate does.
    keep = self.window - new if new < self.window else self.window
    prompts = [np.asarray(([self.sep] + self.encode(c))[-keep:], np.int32)
               for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows, texts = self.scorer.rows, [""] * len(prompts)
    for start in range(0, len(order), rows):
      chunk = order[start:start + rows]
      gen = sampler.generate([prompts[i] for i in chunk], new,
                             end_id=self.sep, pad_id=self.sep,
                             batch_multiple=rows)
      for i, ids in zip(chunk, gen.tokens):
        texts[i] = postprocess_generated_text(self.tok.decode(ids), until, None)
      on_batch(len(chunk))
    return texts


def _batch_size(value) -> int:
  """The harness's batch size ("auto" is not measured here: 8)."""
  if value in (None, "auto") or str(value).startswith("auto"):
    return 8
  try:
    size = int(value)
  except (TypeError, ValueError):
    size = 0
  if size < 1:
    raise ConfigError(f"--batch_size: got {value!r}; expected a positive integer")
  return size


if MODEL_NAME not in model_registry:
  register_model(MODEL_NAME)(UltraMemLM)


def lm_eval_main() -> None:
  """``lm_eval``'s own command line with ``ultramem_jax`` registered:
  ``ultramem-lm-eval --model ultramem_jax --model_args run_dir=RUN --tasks
  arc_easy`` (or ``python -m ultramem_jax.evaluation.harness_model ...``)."""
  cli_evaluate()


if __name__ == "__main__":
  lm_eval_main()
