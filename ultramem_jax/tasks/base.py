"""Shared pieces of the task generators: token space, instances, scoring.

Token-id conventions
--------------------
Tasks live inside the text model's vocabulary. :class:`TokenSpace` reserves
a block of ids at the top of it (by default the top ``min(512, vocab // 2)``
ids, skipping excluded ids such as the tokenizer's separator) and splits the
block, in ascending order, into

* ``NUM_MARKERS`` marker ids with fixed roles (``BOS``, ``PAD``, ``QUERY``,
  ``ROUND``, ``NEEDLE``, ``ARROW``, ``FACT``, ``SEP``),
* the key alphabet (the lower half of the rest),
* the value alphabet (the upper half).

Every other id is "free": the natural filler text of the needle task only
uses free ids (reserved ids are removed from it), so a prompt can always be
parsed unambiguously. Keys, entities and relations are drawn from the key
alphabet; every answer is a run of value-alphabet tokens, so the chance
level of a guesser that draws answer tokens uniformly from the value
alphabet is ``|values| ** -answer_len`` for every task (:func:`chance`).

Instances and rows
------------------
An :class:`Instance` is a token sequence with answer spans: the model reads
the tokens with teacher forcing and an answer counts as correct when the
predictions of all its tokens match (:func:`exact_match`). Instances pack
into fixed rows of ``seq_len + 1`` tokens (:func:`collate`): inputs are
``tokens[:-1]``, targets ``tokens[1:]``, padding is masked out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Literal, NamedTuple, Sequence

import numpy as np

MARKERS = ("BOS", "PAD", "QUERY", "ROUND", "NEEDLE", "ARROW", "FACT", "SEP")
NUM_MARKERS = len(MARKERS)

# Kinds of token ids in TokenSpace.kind.
FREE, MARKER, KEY, VALUE = 0, 1, 2, 3

# A size parameter: None (as many as fit), an int (exactly), or an inclusive
# (lo, hi) range drawn uniformly per instance and clipped to what fits.
Size = int | tuple[int, int] | None

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")


class TaskError(ValueError):
  """A task parameter or length that cannot be used; the message names it."""


# ----------------------------------------------------------------------------
# Token space
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenSpace:
  """Which ids of a vocabulary of `vocab_size` the tasks use, and for what.

  Attributes:
    vocab_size: the model's vocabulary size; every generated id is below it.
    reserved: the reserved ids, ascending: markers, then keys, then values.
    exclude: ids never generated (e.g. the tokenizer's document separator).
  """

  vocab_size: int
  reserved: tuple[int, ...]
  exclude: tuple[int, ...] = ()

  def __post_init__(self):
    if len(set(self.reserved)) != len(self.reserved):
      raise TaskError("TokenSpace.reserved has repeated ids")
    if any(not 0 <= i < self.vocab_size for i in self.reserved):
      raise TaskError(
          f"TokenSpace.reserved has ids outside [0, {self.vocab_size})")
    if set(self.reserved) & set(self.exclude):
      raise TaskError("TokenSpace.reserved overlaps TokenSpace.exclude")
    if len(self.reserved) < NUM_MARKERS + 4:
      raise TaskError(
          f"a token space needs at least {NUM_MARKERS + 4} reserved ids "
          f"({NUM_MARKERS} markers, 2 keys, 2 values); "
          f"got {len(self.reserved)}")

  @classmethod
  def for_vocab(cls, vocab_size: int, exclude: Iterable[int] = (),
                num_reserved: int | None = None) -> "TokenSpace":
    """Reserves the top `num_reserved` ids of the vocabulary not in `exclude`.

    The default, ``min(512, vocab_size // 2)``, gives the byte tokenizer
    (257 ids, separator 256 excluded) ids 128..255: 8 markers, 60 keys and
    60 values; a BPE vocabulary of 4096 gets its 512 rarest merges: 8
    markers, 252 keys, 252 values.
    """
    exclude = tuple(sorted({int(i) for i in exclude}))
    if num_reserved is None:
      num_reserved = min(512, vocab_size // 2)
    candidates = [i for i in range(vocab_size - 1, -1, -1) if i not in exclude]
    if num_reserved > len(candidates):
      raise TaskError(f"cannot reserve {num_reserved} task ids in a vocabulary "
                      f"of {vocab_size} ({len(exclude)} excluded)")
    return cls(vocab_size, tuple(sorted(candidates[:num_reserved])), exclude)

  @classmethod
  def for_tokenizer(cls, tokenizer: Any,
                    num_reserved: int | None = None) -> "TokenSpace":
    """The default space of a text tokenizer (its separator excluded)."""
    return cls.for_vocab(tokenizer.vocab_size, (tokenizer.sep_id,),
                         num_reserved)

  # Marker ids.
  def marker(self, name: str) -> int:
    return self.reserved[MARKERS.index(name)]

  bos = property(lambda self: self.marker("BOS"))
  pad = property(lambda self: self.marker("PAD"))
  query = property(lambda self: self.marker("QUERY"))
  round = property(lambda self: self.marker("ROUND"))
  needle = property(lambda self: self.marker("NEEDLE"))
  arrow = property(lambda self: self.marker("ARROW"))
  fact = property(lambda self: self.marker("FACT"))
  sep = property(lambda self: self.marker("SEP"))

  @functools.cached_property
  def keys(self) -> np.ndarray:
    """The key alphabet, int32 ascending."""
    rest = self.reserved[NUM_MARKERS:]
    return np.asarray(rest[:len(rest) // 2], np.int32)

  @functools.cached_property
  def values(self) -> np.ndarray:
    """The value (answer) alphabet, int32 ascending."""
    rest = self.reserved[NUM_MARKERS:]
    return np.asarray(rest[len(rest) // 2:], np.int32)

  @functools.cached_property
  def free(self) -> np.ndarray:
    """Ids that are neither reserved nor excluded (filler text uses these)."""
    mask = self.kind == FREE
    mask[list(self.exclude)] = False
    return np.flatnonzero(mask).astype(np.int32)

  @functools.cached_property
  def kind(self) -> np.ndarray:
    """int8 [vocab_size]: FREE, MARKER, KEY or VALUE for every id."""
    kind = np.zeros(self.vocab_size, np.int8)
    kind[list(self.reserved[:NUM_MARKERS])] = MARKER
    kind[self.keys] = KEY
    kind[self.values] = VALUE
    return kind

  def describe(self) -> str:
    return (f"vocab {self.vocab_size}: markers {self.reserved[:NUM_MARKERS]}, "
            f"{len(self.keys)} keys {self.keys[0]}..{self.keys[-1]}, "
            f"{len(self.values)} values {self.values[0]}..{self.values[-1]}")


def default_space(vocab_size: int | None = None, tokenizer: Any = None,
                  space: TokenSpace | None = None) -> TokenSpace:
  """The space given, else that of `tokenizer`, else of a bare vocabulary."""
  if space is not None:
    return space
  if tokenizer is not None:
    if vocab_size not in (None, tokenizer.vocab_size):
      raise TaskError(f"vocab_size={vocab_size} differs from the tokenizer's "
                      f"{tokenizer.vocab_size}")
    return TokenSpace.for_tokenizer(tokenizer)
  if vocab_size is None:
    raise TaskError("give a vocab_size, a tokenizer or a TokenSpace")
  return TokenSpace.for_vocab(vocab_size)


# ----------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Instance:
  """One generated example.

  Attributes:
    tokens: int32 [T], the whole sequence with its answers (teacher forcing).
    spans: int32 [A, 2], ``[start, stop)`` of each answer in `tokens`.
    meta: instance metadata (task, length, depth, n_demos, ...).
    answer_meta: answer-level metadata as columns, each an array of A values
      (e.g. ``round``, or the ``form`` of a fact query); bucket names are
      looked up here first, then in `meta`.
  """

  tokens: np.ndarray
  spans: np.ndarray
  meta: dict[str, Any]
  answer_meta: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def answer_mask(self) -> np.ndarray:
    """bool [T]: True on answer tokens."""
    delta = np.zeros(len(self.tokens) + 1, np.int32)
    np.add.at(delta, self.spans[:, 0], 1)
    np.add.at(delta, self.spans[:, 1], -1)
    return np.cumsum(delta[:-1]) > 0

  @property
  def answers(self) -> list[np.ndarray]:
    return [self.tokens[s:e] for s, e in self.spans]

  def bucket(self, i: int, name: str) -> Any:
    """Metadata `name` of answer `i` (answer-level first, then instance)."""
    if name in self.answer_meta:
      return self.answer_meta[name][i].item()
    return self.meta.get(name)

  def answer_info(self, i: int) -> dict[str, Any]:
    """All answer-level metadata of answer `i`, as Python values."""
    return {k: v[i].item() for k, v in self.answer_meta.items()}


class Builder:
  """Accumulates the tokens and answer spans of one instance."""

  def __init__(self):
    self._chunks: list[np.ndarray] = []
    self._len = 0
    self._spans: list[np.ndarray] = []
    self._meta: list[dict[str, np.ndarray]] = []

  def __len__(self) -> int:
    return self._len

  def add(self, *ids: int | Sequence[int] | np.ndarray) -> "Builder":
    for x in ids:
      chunk = np.atleast_1d(np.asarray(x, np.int32))
      self._chunks.append(chunk)
      self._len += len(chunk)
    return self

  def answer(self, ids: Sequence[int] | np.ndarray, **meta: Any) -> "Builder":
    """Adds one answer span."""
    return self.items(np.zeros((1, 0), np.int32), np.asarray(ids)[None],
                      **{k: [v] for k, v in meta.items()})

  def items(self, prompts: np.ndarray, answers: np.ndarray,
            **meta: Sequence[Any]) -> "Builder":
    """Adds rows ``prompts[i] answers[i]`` at once, each answer a span.

    Args:
      prompts: int [m, a], the tokens before each answer.
      answers: int [m, b], the answers.
      **meta: per-answer metadata, one sequence of m values per name.
    """
    prompts, answers = np.asarray(prompts), np.asarray(answers)
    m, a = prompts.shape
    width = a + answers.shape[1]
    starts = self._len + a + width * np.arange(m)
    self.add(np.concatenate([prompts, answers], axis=1).ravel())
    self._spans.append(np.stack([starts, starts + answers.shape[1]], axis=1))
    self._meta.append({k: np.asarray(v) for k, v in meta.items()})
    return self

  def build(self, **meta: Any) -> Instance:
    tokens = (np.concatenate(self._chunks) if self._chunks
              else np.zeros((0,), np.int32))
    spans = (np.concatenate(self._spans).astype(np.int32) if self._spans
             else np.zeros((0, 2), np.int32))
    names = set(self._meta[0]) if self._meta else set()
    if any(set(m) != names for m in self._meta):
      raise TaskError("every answer of an instance needs the same metadata")
    columns = {k: np.concatenate([m[k] for m in self._meta]) for k in names}
    return Instance(tokens, spans, {**meta, "tokens": int(len(tokens))},
                    columns)


# ----------------------------------------------------------------------------
# Sampling helpers
# ----------------------------------------------------------------------------


def pick_size(spec: Size, hi: int, rng: np.random.Generator, what: str,
              lo: int = 1) -> int:
  """Resolves a :data:`Size` against the most that fits (`hi`).

  Raises TaskError naming `what` when nothing fits or an exact value is
  larger than `hi`.
  """
  if hi < lo:
    raise TaskError(f"{what}: the length is too short for {lo} "
                    f"(at most {max(hi, 0)} fit)")
  if spec is None:
    return hi
  if isinstance(spec, (tuple, list)):
    if len(spec) != 2 or spec[0] > spec[1] or spec[0] < lo:
      raise TaskError(f"{what}={spec!r}: expected an inclusive range (lo, hi) "
                      f"with {lo} <= lo <= hi")
    a, b = int(spec[0]), min(int(spec[1]), hi)
    if b < a:
      raise TaskError(f"{what}={spec!r}: at most {hi} fit in this length")
    return int(rng.integers(a, b + 1))
  spec = int(spec)
  if spec < lo:
    raise TaskError(f"{what}={spec}: must be at least {lo}")
  if spec > hi:
    raise TaskError(f"{what}={spec}: at most {hi} fit in this length")
  return spec


def capacity(alphabet: int, width: int) -> int:
  """How many distinct tuples of `width` tokens an alphabet gives."""
  return alphabet ** width


def distinct_tuples(rng: np.random.Generator, alphabet: np.ndarray, width: int,
                    n: int) -> np.ndarray:
  """`n` distinct tuples of `width` ids from `alphabet`: int32 [n, width]."""
  codes = rng.choice(capacity(len(alphabet), width), size=n, replace=False)
  return alphabet[decode_codes(codes, len(alphabet), width)]


def random_tuples(rng: np.random.Generator, alphabet: np.ndarray, width: int,
                  n: int) -> np.ndarray:
  """`n` tuples of `width` ids drawn uniformly (repeats allowed)."""
  return alphabet[rng.integers(0, len(alphabet), size=(n, width))]


def decode_codes(codes: np.ndarray, base: int, width: int) -> np.ndarray:
  """Integer codes -> [n, width] digits in `base` (most significant first)."""
  codes = np.asarray(codes, np.int64)
  digits = np.empty((len(codes), width), np.int64)
  for j in range(width - 1, -1, -1):
    digits[:, j] = codes % base
    codes = codes // base
  return digits


# ----------------------------------------------------------------------------
# Parsing (for the brute-force solvers)
# ----------------------------------------------------------------------------


class Run(NamedTuple):
  """A maximal stretch of same-kind tokens (markers are single-token runs)."""

  kind: int
  start: int
  stop: int


def runs(tokens: np.ndarray, space: TokenSpace) -> list[Run]:
  """Splits `tokens` into runs of FREE, KEY and VALUE ids and single markers."""
  tokens = np.asarray(tokens)
  if len(tokens) == 0:
    return []
  kind = space.kind[tokens]
  cut = np.flatnonzero((kind[1:] != kind[:-1]) | (kind[1:] == MARKER)) + 1
  starts = np.concatenate([[0], cut])
  stops = np.concatenate([cut, [len(tokens)]])
  return [Run(int(kind[s]), int(s), int(e)) for s, e in zip(starts, stops)]


def key_of(tokens: np.ndarray, run: Run) -> tuple[int, ...]:
  return tuple(int(t) for t in tokens[run.start:run.stop])


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------


def recall(tokens: np.ndarray, space: TokenSpace) -> list[tuple[int, np.ndarray]]:
  """Associative recall by brute force, for the MQAR prompts: key-value
  pairs are stored (a later pair overwrites a key), each key after QUERY
  is answered with its latest value; ROUND ends a round's queries."""
  memory: dict[tuple[int, ...], tuple[int, ...]] = {}
  out = []
  querying = False
  pending = None
  for run in runs(tokens, space):
    if run.kind == MARKER:
      t = tokens[run.start]
      if t == space.query:
        querying = True
      elif t == space.round:
        querying = False
      pending = None
    elif run.kind == KEY:
      if querying:
        out.append((run.stop, np.asarray(memory[key_of(tokens, run)],
                                         np.int32)))
      pending = run
    elif run.kind == VALUE and pending is not None:
      if not querying:
        memory[key_of(tokens, pending)] = key_of(tokens, run)
      pending = None
  return out


def exact_match(pred: np.ndarray, instance: Instance) -> np.ndarray:
  """bool [A]: whether each answer of `instance` is predicted exactly.

  Args:
    pred: int [>= T - 1] next-token predictions aligned with the targets,
      ``pred[t]`` being the prediction of ``tokens[t + 1]`` (the argmax of a
      model's logits on ``inputs = tokens[:-1]``); a longer, padded row is
      fine.
    instance: the instance whose answers are scored.
  """
  pred = np.asarray(pred)
  if len(pred) < len(instance.tokens) - 1:
    raise TaskError(f"exact_match: {len(pred)} predictions for an instance of "
                    f"{len(instance.tokens)} tokens (need at least "
                    f"{len(instance.tokens) - 1})")
  return np.asarray([
      np.array_equal(pred[s - 1:e - 1], instance.tokens[s:e])
      for s, e in instance.spans], bool)


def chance(instance: Instance, space: TokenSpace) -> np.ndarray:
  """float [A]: the exact-match probability of each answer for a guesser that
  draws every answer token uniformly from the value alphabet."""
  lengths = instance.spans[:, 1] - instance.spans[:, 0]
  return np.power(float(len(space.values)), -lengths.astype(np.float64))


def aggregate(instances: Sequence[Instance], correct: Sequence[np.ndarray],
              by: Sequence[str] = (), space: TokenSpace | None = None,
              ) -> dict[tuple, dict[str, float]]:
  """Accuracy per bucket of answer metadata.

  Args:
    instances: the scored instances.
    correct: for each instance, the bool [A] of :func:`exact_match`.
    by: metadata names forming the bucket key (e.g. ``("depth", "length")``);
      empty gives a single bucket ``()``.
    space: when given, each bucket also reports its mean chance level.

  Returns:
    ``{bucket values: {"n", "correct", "accuracy"[, "chance"]}}``, buckets
    sorted.
  """
  sums: dict[tuple, list[float]] = {}
  for inst, ok in zip(instances, correct, strict=True):
    p = chance(inst, space) if space is not None else None
    for i, hit in enumerate(np.asarray(ok, bool)):
      key = tuple(inst.bucket(i, name) for name in by)
      s = sums.setdefault(key, [0, 0, 0.0])
      s[0] += 1
      s[1] += int(hit)
      if p is not None:
        s[2] += p[i]
  out = {}
  for key in sorted(sums, key=lambda k: tuple((v is None, str(type(v)), v)
                                              for v in k)):
    n, c, p = sums[key]
    out[key] = {"n": n, "correct": c, "accuracy": c / n}
    if space is not None:
      out[key]["chance"] = p / n
  return out


# ----------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------


class TaskRows(NamedTuple):
  """Fixed-length training/eval rows.

  Attributes:
    inputs: int32 [n, seq_len], ``tokens[:-1]`` padded with the PAD marker.
    targets: int32 [n, seq_len], ``tokens[1:]`` padded.
    loss_mask: float32 [n, seq_len], 1 on the targets that carry loss (the
      answer tokens, or every real token), 0 on padding.
  """

  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray

  def as_batch(self) -> dict[str, np.ndarray]:
    """The dict the training loop takes (``weights`` is the loss mask)."""
    return {"inputs": self.inputs, "targets": self.targets,
            "weights": self.loss_mask}


LossOn = Literal["answers", "all"]


def collate(instances: Sequence[Instance], seq_len: int, space: TokenSpace,
            loss_on: LossOn = "answers") -> TaskRows:
  """Pads instances (at most ``seq_len + 1`` tokens each) into rows.

  `loss_on` "answers" puts loss on answer tokens only; "all" on every real
  target token (prompt and filler too), never on padding.
  """
  if loss_on not in ("answers", "all"):
    raise TaskError(f"loss_on={loss_on!r}: expected 'answers' or 'all'")
  n = len(instances)
  rows = np.full((n, seq_len + 1), space.pad, np.int32)
  mask = np.zeros((n, seq_len + 1), np.float32)
  for r, inst in enumerate(instances):
    t = len(inst.tokens)
    if t > seq_len + 1:
      raise TaskError(f"an instance of {t} tokens does not fit a row of "
                      f"seq_len={seq_len} (+1)")
    rows[r, :t] = inst.tokens
    if loss_on == "answers":
      mask[r, :t] = inst.answer_mask
    else:
      mask[r, 1:t] = 1.0
  return TaskRows(rows[:, :-1], rows[:, 1:], mask[:, 1:])


# ----------------------------------------------------------------------------
# Task base class
# ----------------------------------------------------------------------------


class Task:
  """A generator with its brute-force solver.

  Subclasses are frozen dataclasses whose fields are the task's parameters
  (override them with ``dataclasses.replace`` or :func:`get_task`).
  """

  name: str = ""

  def generate(self, rng: np.random.Generator, space: TokenSpace, length: int,
               *, split: Split = "train",
               filler: np.ndarray | None = None) -> Instance:
    """One instance of at most `length` tokens (tasks that fill it exactly,
    like the needle, give exactly `length`)."""
    raise NotImplementedError

  def solve(self, tokens: np.ndarray, space: TokenSpace
            ) -> list[tuple[int, np.ndarray]]:
    """Recovers every answer by parsing the prompt: ``[(start, tokens)]``.

    The answer tokens themselves are never read (only the prompt before
    each answer and the marker structure), so corrupting them does not
    change the result.
    """
    raise NotImplementedError

  def sample(self, seed: int, space: TokenSpace, length: int, *,
             split: Split = "train", filler: np.ndarray | None = None
             ) -> Instance:
    """:meth:`generate` with a fresh generator seeded by `seed`."""
    return self.generate(np.random.default_rng(seed), space, length,
                         split=split, filler=filler)
