"""Fact retrieval: parametric memory of a fixed synthetic fact base.

After Zoology's ``knowledge.py``: a fact base, fixed by `fact_seed`, maps
``(entity, relation)`` to an object (``n_entities`` distinct key tuples of
``entity_len`` tokens, ``n_relations`` relation ids from the key alphabet,
objects of ``object_len`` value tokens). The facts are never in the prompt
that asks them: the model must have stored them in its weights during
training. Two surface forms, so a held-out split can test extraction of
stored knowledge in a form not trained for those entities (the
"knowledge storage and extraction" setting)::

    statement:  FACT  e_1..e_L r  o        (entity, relation, object)
    query:      QUERY r e_1..e_L  o        (relation first: a paraphrase)

A row is ``BOS`` followed by as many items as fit, each about a different
fact, in random order. Forms, recorded per answer as ``form``:

* ``statement``: every fact is stated in training; at eval, the same
  statements in fresh rows (new neighbours and order) test recall;
* ``qa_seen``: the query form of entities whose queries are trained
  (a ``qa_fraction`` of the entities, fixed by `fact_seed`);
* ``qa_heldout``: the query form of the other entities, never trained in
  that form: their facts were only ever seen as statements.

Training rows (split "train") mix statements (probability
``statement_prob``) and ``qa_seen`` queries; eval rows (split "eval") ask
`form`, or every form in equal shares when `form` is None.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Literal, NamedTuple

import numpy as np

from ultramem_jax.tasks.base import Task
from ultramem_jax.tasks.instance import Builder, Instance
from ultramem_jax.tasks.parsing import Run, key_of, runs
from ultramem_jax.tasks.sampling import (
    Size, capacity, distinct_tuples, pick_size, random_tuples)
from ultramem_jax.tasks.space import KEY, MARKER, VALUE, TaskError, TokenSpace

FORMS = ("statement", "qa_seen", "qa_heldout")
Form = Literal["statement", "qa_seen", "qa_heldout"]


class FactBase(NamedTuple):
  """The facts, as token ids."""

  entities: np.ndarray   # int32 [E, entity_len]
  relations: np.ndarray  # int32 [R]
  objects: np.ndarray    # int32 [E, R, object_len]
  qa_seen: np.ndarray    # bool [E]: entities whose query form is trained

  @property
  def num_facts(self) -> int:
    return self.objects.shape[0] * self.objects.shape[1]


@dataclasses.dataclass(frozen=True)
class FactRetrieval(Task):
  """Fact retrieval.

  Attributes:
    n_entities: entities in the fact base.
    n_relations: relations per entity (every entity has every relation).
    entity_len: tokens per entity name.
    object_len: tokens per object (the answer).
    fact_seed: seeds the fact base (not the rows).
    qa_fraction: share of entities whose query form is trained.
    statement_prob: in training rows, the probability of an item being a
      statement rather than a ``qa_seen`` query.
    form: the form eval rows ask; None mixes all three.
    items: facts per row; None fills the length.
  """

  name = "fact_retrieval"
  n_entities: int = 256
  n_relations: int = 4
  entity_len: int = 2
  object_len: int = 1
  fact_seed: int = 0
  qa_fraction: float = 0.5
  statement_prob: float = 0.5
  form: Form | None = None
  items: Size = None

  # -- the fact base ---------------------------------------------------------

  def facts(self, space: TokenSpace) -> FactBase:
    """The fact base: a function of the parameters and `space` only."""
    return _fact_base(self.n_entities, self.n_relations, self.entity_len,
                      self.object_len, self.fact_seed, self.qa_fraction, space)

  def corpus(self, space: TokenSpace,
             length: int = 129) -> list[Instance]:
    """Every fact stated once, in a fixed shuffled order, packed into
    instances of at most `length` tokens (one epoch of the statements)."""
    fb = self.facts(space)
    order = np.random.default_rng([self.fact_seed, 1]).permutation(fb.num_facts)
    per_row = self._fit(length)
    out = []
    for start in range(0, len(order), per_row):
      b = Builder().add(space.bos)
      chunk = order[start:start + per_row]
      self._items(b, space, fb, chunk, np.full(len(chunk), "statement"))
      out.append(b.build(task=self.name, length=length, split="corpus"))
    return out

  # -- generation ------------------------------------------------------------

  def generate(self, rng, space, length, *, split="train", filler=None):
    fb = self.facts(space)
    r = fb.objects.shape[1]
    n = pick_size(self.items, self._fit(length), rng, f"{self.name}.items")
    if self.form is not None and self.form not in FORMS:
      raise TaskError(f"{self.name}.form={self.form!r}: expected one of "
                      f"{', '.join(FORMS)} or None")
    if not 0.0 <= self.statement_prob <= 1.0:
      raise TaskError(f"{self.name}.statement_prob={self.statement_prob}: "
                      "must be in [0, 1]")
    if split == "train":
      n_qa = (int(rng.binomial(n, 1.0 - self.statement_prob))
              if fb.qa_seen.any() else 0)
      counts = {"statement": n - n_qa, "qa_seen": n_qa, "qa_heldout": 0}
    elif split == "eval":
      forms = ([self.form] if self.form is not None else
               [f for f in FORMS if f == "statement"
                or (f == "qa_seen" and fb.qa_seen.any())
                or (f == "qa_heldout" and not fb.qa_seen.all())])
      drawn = np.bincount(rng.integers(0, len(forms), size=n),
                          minlength=len(forms))
      counts = {f: 0 for f in FORMS}
      counts.update({f: int(c) for f, c in zip(forms, drawn)})
    else:
      raise TaskError(f"split={split!r}: expected 'train' or 'eval'")

    # Distinct facts across the whole row, so none can be copied in context.
    fact_ids = np.arange(fb.num_facts)
    seen = np.repeat(fb.qa_seen, r)
    picked: dict[str, np.ndarray] = {}
    for form, pool in (("qa_seen", fact_ids[seen]),
                       ("qa_heldout", fact_ids[~seen])):
      k = min(counts[form], len(pool))
      if counts[form] and not k:
        raise TaskError(f"{self.name}: no facts of form {form} "
                        f"(qa_fraction={self.qa_fraction})")
      picked[form] = rng.choice(pool, size=k, replace=False)
    taken = np.concatenate([picked["qa_seen"], picked["qa_heldout"]])
    free = np.ones(fb.num_facts, bool)
    free[taken] = False
    rest = fact_ids[free]
    picked["statement"] = rng.choice(
        rest, size=min(counts["statement"], len(rest)), replace=False)
    facts = np.concatenate([picked[f] for f in FORMS])
    forms = np.repeat(np.asarray(FORMS), [len(picked[f]) for f in FORMS])
    order = rng.permutation(len(facts))
    b = Builder().add(space.bos)
    self._items(b, space, fb, facts[order], forms[order])
    return b.build(task=self.name, length=length, split=split,
                   items=len(facts))

  def _fit(self, length: int) -> int:
    return (length - 1) // (2 + self.entity_len + self.object_len)

  def _items(self, b: Builder, space, fb: FactBase, facts: np.ndarray,
             forms: np.ndarray):
    """Adds one item per fact id (``entity * n_relations + relation``)."""
    e, r = np.divmod(facts, fb.objects.shape[1])
    statement = (forms == "statement")[:, None]
    marker = np.where(statement, space.fact, space.query)
    rel = fb.relations[r][:, None]
    prompts = np.concatenate([
        marker,
        np.where(statement, fb.entities[e][:, :1], rel),
        np.where(statement, np.concatenate([fb.entities[e][:, 1:], rel], 1),
                 fb.entities[e])], axis=1)
    b.items(prompts, fb.objects[e, r], form=forms)

  # -- solving ---------------------------------------------------------------

  @staticmethod
  def learn(texts: Iterable[Instance | np.ndarray],
            space: TokenSpace) -> dict[tuple, tuple[int, ...]]:
    """Reads facts off training text: ``{(entity, relation): object}``.

    Statements and query-form items are parsed from the tokens (the
    generator's fact base is not consulted).
    """
    known = {}
    for text in texts:
      if isinstance(text, Instance):
        text = text.tokens
      tokens = np.asarray(text)
      rs = runs(tokens, space)
      for a, k, v in zip(rs, rs[1:], rs[2:]):
        if a.kind != MARKER or k.kind != KEY or v.kind != VALUE:
          continue
        known_key = _fact_key(tokens, a, k, space)
        if known_key is not None:
          known[known_key] = key_of(tokens, v)
    return known

  def solve(self, tokens, space, knowledge: dict | None = None):
    """Answers every item from `knowledge` (by default, what :meth:`learn`
    reads off :meth:`corpus`: a model that memorised the training
    statements perfectly). The prompt itself never holds the answers."""
    if knowledge is None:
      knowledge = _corpus_knowledge(self, space)
    tokens = np.asarray(tokens)
    rs = runs(tokens, space)
    out = []
    for a, k in zip(rs, rs[1:]):
      if a.kind == MARKER and k.kind == KEY:
        key = _fact_key(tokens, a, k, space)
        if key is not None:
          out.append((k.stop, np.asarray(knowledge[key], np.int32)))
    return out


def _fact_key(tokens, marker: Run, run: Run, space):
  """(entity, relation) of a statement or query item, else None."""
  ids = key_of(tokens, run)
  if len(ids) < 2:
    return None
  if tokens[marker.start] == space.fact:
    return ids[:-1], ids[-1]
  if tokens[marker.start] == space.query:
    return ids[1:], ids[0]
  return None


@functools.lru_cache(maxsize=16)
def _fact_base(n_entities, n_relations, entity_len, object_len, fact_seed,
               qa_fraction, space) -> FactBase:
  cap = capacity(len(space.keys), entity_len)
  if not 1 <= n_entities <= cap:
    raise TaskError(f"fact_retrieval.n_entities={n_entities}: must be in "
                    f"[1, {cap}] (distinct entities of {entity_len} keys)")
  if not 1 <= n_relations <= len(space.keys):
    raise TaskError(f"fact_retrieval.n_relations={n_relations}: must be "
                    f"in [1, {len(space.keys)}]")
  if not 0.0 <= qa_fraction <= 1.0:
    raise TaskError(f"fact_retrieval.qa_fraction={qa_fraction}: must be "
                    "in [0, 1]")
  rng = np.random.default_rng([fact_seed, 0xFAC75])
  entities = distinct_tuples(rng, space.keys, entity_len, n_entities)
  relations = rng.choice(space.keys, size=n_relations, replace=False)
  objects = random_tuples(rng, space.values, object_len,
                          n_entities * n_relations)
  seen = np.zeros(n_entities, bool)
  n_seen = int(round(qa_fraction * n_entities))
  seen[rng.permutation(n_entities)[:n_seen]] = True
  fb = FactBase(entities.astype(np.int32), relations.astype(np.int32),
                objects.reshape(n_entities, n_relations, object_len
                                ).astype(np.int32), seen)
  for a in fb:
    a.setflags(write=False)  # shared through the cache
  return fb


@functools.lru_cache(maxsize=16)
def _corpus_knowledge(task: FactRetrieval, space) -> dict:
  return FactRetrieval.learn(task.corpus(space), space)
