"""``model.memory`` -> the stages of a memory layer, in one place.

:func:`memory_recipe` is the only code that reads the variant flags of
``MemoryConfig`` (score, tucker_*, per_rank_queries, normalize_scores,
pre_value_*, value_activation, value_expansion, output_*, share_values,
value_init); the layer runs the stages it returns. A combination no stage
can run is refused here, where the stage is built, with a
:class:`~ultramem_jax.config.ConfigError` naming the key, the value and
what is allowed. The function is pure Python (no arrays), cheap enough for
config validation to call at load time.

The variants of the spec (sections 2 and 6) are named recipes, the stage
kinds in :data:`RECIPES`; :attr:`MemoryRecipe.name` says which one a config
built (``custom`` for any other mix the stages allow).
"""

from __future__ import annotations

import dataclasses

from ultramem_jax.config import require
from ultramem_jax.model.common import linear_std
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.memory.readout import (GatedOutput, InputPreValues,
                                               NoOutput, OutputProjection,
                                               ProjectedPreValues, ValueRead)
from ultramem_jax.model.memory.stages import (RawWeights, Retrieval,
                                              SoftmaxWeights, SumRetrieval,
                                              TuckerRetrieval)

KEY = "model.memory"


@dataclasses.dataclass(frozen=True)
class MemoryRecipe:
  """The four stages of one memory layer (spec section 2, steps 1-7)."""
  retrieval: Retrieval                        # steps 1-5
  weighting: RawWeights | SoftmaxWeights      # step 6, the weights
  read: ValueRead                             # step 6, the weighted read
  output: OutputProjection | GatedOutput | NoOutput   # step 7

  @property
  def kinds(self) -> tuple[str, str, str, str]:
    pre = self.read.pre_values
    return (type(self.retrieval).__name__, type(self.weighting).__name__,
            type(pre).__name__ if pre is not None else "NoPreValues",
            type(self.output).__name__)

  @property
  def name(self) -> str:
    """The spec's variant these stages make, or ``custom``."""
    return next((n for n, kinds in RECIPES.items() if kinds == self.kinds),
                "custom")


# The variants as stage kinds: (retrieval, weighting, pre-values, output).
RECIPES: dict[str, tuple[str, str, str, str]] = {
    "UltraMemV2": ("TuckerRetrieval", "RawWeights", "ProjectedPreValues",
                   "OutputProjection"),
    "UltraMem v1": ("TuckerRetrieval", "RawWeights", "NoPreValues",
                    "OutputProjection"),
    "Memory+": ("SumRetrieval", "SoftmaxWeights", "NoPreValues", "GatedOutput"),
    "PKM": ("SumRetrieval", "SoftmaxWeights", "NoPreValues", "NoOutput"),
    "PEER": ("SumRetrieval", "SoftmaxWeights", "InputPreValues", "NoOutput"),
}


def memory_recipe(m: ModelConfig) -> MemoryRecipe:
  """The stages ``m.memory`` asks for; raises ConfigError for combinations
  they cannot run. Assumes the section's single values are in range (positive
  sizes: the config's own checks run first)."""
  retrieval, weighting = _retrieval(m), _weighting(m)
  output = _output(m)   # before the read: the order the checks always ran in
  return MemoryRecipe(retrieval, weighting, _read(m), output)


def _retrieval(m: ModelConfig) -> Retrieval:
  """Steps 1-5: Tucker (rank r, hc cores) or the sum of sub-key scores."""
  mem = m.memory
  require(m.value_dim % mem.tucker_cores == 0, f"{KEY}.value_dim", m.value_dim,
           f"must be divisible by tucker_cores={mem.tucker_cores} (multi-core "
           "scoring splits the value columns into equal chunks)")
  if mem.score == "sum":
    require(mem.tucker_rank == 1 and mem.tucker_cores == 1, f"{KEY}.score",
             mem.score, "'sum' needs tucker_rank: 1 and tucker_cores: 1")
  if not mem.per_rank_queries:
    require(mem.tucker_rank >= 2, f"{KEY}.per_rank_queries", False,
             "the released-code queries q[0, 0], q[0, 1] need tucker_rank >= 2")
  common = dict(heads=mem.heads, query_heads=1 if mem.share_query else mem.heads,
                key_dim=mem.key_dim, rank=mem.tucker_rank, k=mem.k,
                top_m=mem.top_m, per_rank_queries=mem.per_rank_queries,
                key_balance=mem.key_balance, ring=mem.share_values)
  if mem.score == "sum":
    return SumRetrieval(**common)
  return TuckerRetrieval(**common, cores=mem.tucker_cores,
                         core_penalty=mem.core_penalty,
                         core_penalty_tau=mem.core_penalty_tau)


def _weighting(m: ModelConfig) -> RawWeights | SoftmaxWeights:
  """Step 6's weights: the raw kept scores or a softmax over each head's m."""
  mem = m.memory
  if mem.normalize_scores == "softmax":
    require(mem.tucker_cores == 1, f"{KEY}.normalize_scores", "softmax",
             "needs tucker_cores: 1")
    return SoftmaxWeights()
  return RawWeights()


def _read(m: ModelConfig) -> ValueRead:
  """Step 6's read: pre-values through Wp, h itself, or none; E blocks."""
  mem, e = m.memory, m.memory.value_expansion
  pre = None
  if mem.pre_value_dim and not mem.pre_value_proj:
    require(mem.pre_value_dim == m.d_model, f"{KEY}.pre_value_dim",
             mem.pre_value_dim, f"must equal d_model={m.d_model} when "
             "pre_value_proj is false (the input is h itself)")
    pre = InputPreValues(mem.pre_value_dim)
  elif mem.pre_value_dim:
    std = linear_std(m) if mem.init == "paper" else m.d_model ** -0.5
    pre = ProjectedPreValues(mem.pre_value_dim, std)
  if mem.share_values:
    require(0.0 < mem.share_ratio <= 1.0, f"{KEY}.share_ratio", mem.share_ratio,
             "must lie in (0, 1]")
    require(e == 1, f"{KEY}.value_expansion", e,
             "must be 1 when share_values is true")
  if mem.init == "paper" and mem.value_init == "eq26":
    require(mem.pre_value_dim > 0, f"{KEY}.value_init", "eq26",
             "Eq. 26 needs pre-values (pre_value_dim > 0); use 'ultramem' or "
             "'fixed'")
  return ValueRead(pre, mem.value_activation, e, mem.table_sharding)


def _output(m: ModelConfig) -> OutputProjection | GatedOutput | NoOutput:
  """Step 7: Wo, the Memory+ gate (and Wo), or the read itself."""
  mem, e = m.memory, m.memory.value_expansion
  width, lin = e * m.value_dim, linear_std(m)
  if mem.output_proj:
    out = OutputProjection(lin if mem.init == "paper" else width ** -0.5)
  else:
    require(width == m.d_model, f"{KEY}.output_proj", False,
             f"without Wo the read values are the output, so value_expansion * "
             f"value_dim = {width} must equal d_model={m.d_model}")
    out = NoOutput()
  return GatedOutput(lin, out) if mem.output_gate else out
