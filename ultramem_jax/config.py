"""Typed run configuration: dataclasses filled from YAML with dotted overrides.

A config file is a YAML mapping whose top-level keys are the sections below
(``model``, ``data``, ``optimizer``, ``train``, ``mesh``). A file may name a
``base:`` file (relative to itself) whose values it extends; mappings are
merged key by key, anything else is replaced. Command-line overrides are
``dotted.key=value`` with the value parsed as YAML (``optimizer.lr=1e-3``,
``train.resume=false``, ``data.source=/path/to/texts``).

Every problem (an unknown key, a value of the wrong type, an impossible
combination) raises :class:`ConfigError` naming the key, the value and what
is allowed, before anything is built or compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
import types
import typing
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
  """A configuration value that cannot be used; the message names the key."""


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


@dataclasses.dataclass
class MoEConfig:
  """Fine-grained top-k experts, OLMoE style (``model.ffn.kind: moe``)."""

  num_experts: int = 64
  top_k: int = 8
  # Inner width of each SwiGLU expert; 0 means d_model // 2 (OLMoE).
  expert_dim: int = 0
  # Always-active experts of the same width, added to the routed output.
  num_shared_experts: int = 0
  # Renormalise the k chosen router probabilities to sum to 1 (OLMoE: no).
  renormalize: bool = False
  # 0: dropless (grouped matmuls over sorted assignments). > 0: each expert
  # takes at most ceil(capacity_factor * tokens * top_k / num_experts)
  # assignments; the rest are dropped, counted and logged.
  capacity_factor: float = 0.0
  load_balance_coef: float = 0.01
  z_loss_coef: float = 0.001
  # Grouped matmul of the dropless path: `ragged_dot` (jax.lax.ragged_dot,
  # native on TPU/GPU), `blocked` (each expert's rows padded to blocks of
  # `block_size`, one batched matmul with per-block weights: exact, about
  # 1.1x the ideal FLOPs; XLA's CPU ragged_dot is a dense masked product with
  # E times the FLOPs), `gather` (each row's expert weights gathered: reads
  # only the experts used, for decoding), or `auto` (gather when there are
  # no more rows than experts, else blocked on CPU and ragged_dot elsewhere).
  grouped_matmul: Literal["auto", "ragged_dot", "blocked", "gather"] = "auto"
  block_size: int = 64


@dataclasses.dataclass
class FFNConfig:
  """What fills the FFN slot of every block (``model.ffn.kind``)."""

  kind: Literal["dense", "moe"] = "dense"
  # Inner width of the dense SwiGLU FFN; 0 means 8/3 * d_model rounded up to 64.
  inner_dim: int = 0
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)


@dataclasses.dataclass
class MemoryConfig:
  """Product-key memory layers (``model.memory``): UltraMemV2, UltraMem v1,
  Memory+, PKM and PEER are settings of this one section (see the files in
  ``configs/`` and section 2 of the spec). Symbols are the spec's."""

  # Where memory layers sit. "" (none), "all" (every block, in parallel with
  # its FFN), "1,3" (those blocks), or skip pairs "2:5/6:9": a layer reads
  # block 2's normalised FFN input and adds its output after block 5. Quote
  # pairs in YAML: an unquoted 2:5 is the base-60 number 125 to YAML 1.1.
  layers: str | int = ""
  # Drop the dense FFN of the blocks whose input a memory layer reads
  # (Memory+, PKM, PEER) instead of running both in parallel (UltraMem).
  replace_ffn: bool = False
  # Retrieval heads; each has its own keys (and cores), all read one table.
  heads: int = 1
  # All heads use one query (UltraMem v1) instead of one query each.
  share_query: bool = False
  # n: keys per side of the product-key grid of one value block (n*n rows).
  n_keys: int = 64
  # Dk: width of a row query, a column query and every sub-key.
  key_dim: int = 64
  # How a (row, column) pair is scored: "tucker" g = S_row^T C S_col summed
  # over the cores (UltraMem, UltraMemV2), or "sum" g = S_row + S_col
  # (PKM, Memory+, PEER; needs tucker_rank = tucker_cores = 1).
  score: Literal["tucker", "sum"] = "tucker"
  tucker_rank: int = 2
  # hc: Tucker cores; the Dv value columns are split into hc chunks, chunk c
  # weighted by core c's score (multi-core scoring).
  tucker_cores: int = 2
  # true: a row and a column query per rank (the paper). false: the released
  # code's behaviour, q[0, 0] as the row query and q[0, 1] as the column
  # query for every rank (the projection still computes all 2*r queries).
  per_rank_queries: bool = True
  # K: rows and columns kept by the rank-1 pre-filter; 0 means top_m.
  prefilter_k: int = 0
  # m: slots kept per token and head.
  top_m: int = 32
  # Dv: value width; 0 means d_model.
  value_dim: int = 0
  # Dp: pre-value width (UltraMemV2, PEER); 0 disables pre-values.
  pre_value_dim: int = 0
  # false: the pre-value input is h itself (PEER), so Dp must equal d_model.
  pre_value_proj: bool = True
  # Applied to the pre-value products a_k (PEER: gelu; the paper: none).
  value_activation: Literal["none", "gelu", "relu", "silu"] = "none"
  # "none": kept scores weight the values raw (UltraMem); "softmax" over
  # each head's top-m (PKM, Memory+, PEER; needs tucker_cores = 1).
  normalize_scores: Literal["none", "softmax"] = "none"
  # Wo: E*Dv -> d. false: the read values are the output (E*Dv == d_model).
  output_proj: bool = True
  # Memory+: out = Wo(o * silu(Wg h)).
  output_gate: bool = False
  # E: implicit value expansion (UltraMem v1): sqrt(E)*n keys per side
  # address E virtual blocks of the n*n physical rows; each block's
  # weighted sum is kept apart and Wo reads all E. 1 disables it.
  value_expansion: int = 1
  # One table of n*n*(memory layers) rows shared by every memory layer, each
  # reading a ring window of share_ratio of it (spec section 4); its keys per
  # side become floor(sqrt(share_ratio * rows)).
  share_values: bool = False
  share_ratio: float = 1.0
  # "paper": Appendix A (score normalisation by Monte Carlo, linear layers
  # sqrt(2/(5d))). "released": the released code's fixed norm scales
  # Dk**-0.4, Wp std 1/sqrt(d), Wo std 1/sqrt(Dv), values N(0, 0.02).
  init: Literal["paper", "released"] = "paper"
  # Value and pre-value std on the paper path: "eq26" (UltraMemV2; needs
  # pre-values), "ultramem" (variance E/(2*m*heads*L), UltraMem v1) or
  # "fixed" (value_init_std). L is the number of memory layers.
  value_init: Literal["eq26", "ultramem", "fixed"] = "eq26"
  value_init_std: float = 0.02
  # Random unit-variance inputs of the Monte Carlo that calibrates scores.
  init_samples: int = 1024
  # Optional losses, off by default: the Tucker-core penalty
  # alpha/(r-1) * sum_{i>=2} relu(lambda_i - tau)**2 and the key-balance
  # loss beta * n * sum_j f_j p_j per side.
  core_penalty: float = 0.0
  core_penalty_tau: float = 0.15
  key_balance: float = 0.0
  # Implementation of steps 2-3 and 6: "xla" (pure JAX, the reference and the
  # CPU default), "pallas" (the kernels of pallas_kernels/: Mosaic on TPU,
  # Triton on GPU, the interpreter on CPU, which is slow and for tests), or
  # "auto" (Pallas on TPU and GPU, XLA on CPU). Not part of the model: a run
  # may resume or be evaluated with another setting.
  kernels: Literal["xla", "pallas", "auto"] = "auto"
  # How tables are split over the `memory` mesh axis (spec section 5):
  # "column" (all rows, Dv/M columns per device; all-gather of indices and
  # scores, all-to-all of outputs) or "row" (R/M rows per device; masked
  # local read, reduce-scatter of outputs).
  table_sharding: Literal["column", "row"] = "column"

  @property
  def enabled(self) -> bool:
    return bool(str(self.layers).strip())

  @property
  def k(self) -> int:
    return self.prefilter_k or self.top_m


@dataclasses.dataclass
class ModelConfig:
  # 0: taken from the tokenizer when the run is built (BPE size + specials).
  vocab_size: int = 0
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  # Key/value heads for grouped-query attention; 0 means n_heads (plain MHA).
  n_kv_heads: int = 0
  # Width of one attention head; 0 means d_model // n_heads.
  head_dim: int = 0
  ffn: FFNConfig = dataclasses.field(default_factory=FFNConfig)
  memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  # Activations and matmuls run in `dtype`; parameters are kept in
  # `param_dtype`. float64 (for numerical checks) needs JAX_ENABLE_X64=1.
  dtype: Literal["float32", "bfloat16", "float64"] = "float32"
  param_dtype: Literal["float32", "bfloat16", "float64"] = "float32"

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def attn_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def expert_dim(self) -> int:
    return self.ffn.moe.expert_dim or self.d_model // 2

  @property
  def value_dim(self) -> int:
    return self.memory.value_dim or self.d_model

  @property
  def ffn_inner_dim(self) -> int:
    if self.ffn.inner_dim:
      return self.ffn.inner_dim
    return -(-(8 * self.d_model // 3) // 64) * 64


@dataclasses.dataclass
class DataConfig:
  # A corpus name (wiki, sotu, brown, pydoc) or a path to user text: a plain
  # text file (one document), a JSON-lines file or a directory of them.
  source: str = "wiki"
  # Where fetched corpora are cached; "" means $ULTRAMEM_DATA_DIR or
  # ~/.cache/ultramem_jax (never inside the repository).
  data_dir: str = ""
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


@dataclasses.dataclass
class ParamGroupConfig:
  """Learning-rate treatment of one parameter label (see training/optimizer)."""

  lr_multiplier: float = 1.0
  # Multiplier decays linearly to 1x over this many steps; 0 keeps it constant.
  multiplier_decay_steps: int = 0
  weight_decay: bool = True


@dataclasses.dataclass
class OptimizerConfig:
  lr: float = 3e-3
  warmup_steps: int = 30
  # Cosine decay ends at lr * min_lr_ratio at train.steps.
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  # Per-label settings; labels are assigned by training.optimizer.param_labels.
  param_groups: dict[str, ParamGroupConfig] = dataclasses.field(
      default_factory=lambda: {
          "default": ParamGroupConfig(),
          "no_decay": ParamGroupConfig(weight_decay=False),
          # Memory-layer values and pre-values (UltraMemV2: 1x; UltraMem v1
          # configs set 4x decaying to 1x over the run).
          "values": ParamGroupConfig(),
      })


@dataclasses.dataclass
class TrainConfig:
  steps: int = 300
  run_dir: str = "runs/default"
  seed: int = 0
  # null: resume when run_dir holds a checkpoint; true: must resume;
  # false: start fresh (refused if run_dir already holds checkpoints).
  resume: Optional[bool] = None
  log_every: int = 10
  eval_every: int = 100
  # Validation batches per evaluation; 0 evaluates the whole validation split.
  eval_batches: int = 0
  checkpoint_every: int = 100
  # Checkpoints kept; at least 2, so a damaged latest one has a predecessor.
  max_to_keep: int = 3
  progress_bar: bool = True
  # A run directory trained with a different model or data config is
  # refused; true moves it aside (to <run_dir>.replaced-<time>) and starts
  # fresh. Nothing is deleted either way.
  overwrite: bool = False
  # Steps whose loss or gradient norm is not finite are skipped (no update);
  # this many in a row stop the run, keeping the last good checkpoint.
  max_skipped_steps: int = 10
  # A training loss above spike_factor x the mean of the last 100 is logged
  # as a spike (train/loss_spike); 0 disables.
  spike_factor: float = 3.0
  # Fault injection for tests: comma-separated steps whose loss is made NaN.
  fault_nan_steps: str | int = ""


@dataclasses.dataclass
class MeshConfig:
  """Device mesh; one size per axis, -1 means "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  memory: int = 1

  @property
  def axis_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(self))


@dataclasses.dataclass
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(
      default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


# --------------------------------------------------------------------------
# Building typed values from plain data
# --------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
  origin = typing.get_origin(tp)
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if origin is dict:
    k, v = typing.get_args(tp)
    return f"a mapping of {_type_name(k)} to {_type_name(v)}"
  if dataclasses.is_dataclass(tp):
    return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
  if tp is type(None):
    return "null"
  if tp is Any:
    return "any value"
  return {int: "an integer", float: "a number", bool: "true or false",
          str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(tp: Any, value: Any, key: str) -> Any:
  """Converts plain YAML data `value` to type `tp`, or raises ConfigError."""
  origin = typing.get_origin(tp)
  bad = ConfigError(
      f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise bad
    return _build_dataclass(tp, value, key)
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise bad
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _build(arg, value, key)
      except ConfigError:
        pass
    raise bad
  if origin is dict:
    ktp, vtp = typing.get_args(tp)
    if not isinstance(value, dict):
      raise bad
    return {_build(ktp, k, f"{key}.{k}"): _build(vtp, v, f"{key}.{k}")
            for k, v in value.items()}
  if tp is bool:
    if not isinstance(value, bool):
      raise bad
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad
    return value
  if tp is float:
    # YAML 1.1 reads `1e-3` (no dot) as a string; accept such numbers.
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        raise bad from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise bad
    return value
  if tp is Any:  # checked where it is used (e.g. task parameters)
    return value
  raise TypeError(f"unsupported config type {tp!r} at {key}")


def _build_dataclass(cls: type, values: dict, prefix: str) -> Any:
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for k, v in values.items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if k not in hints:
      raise ConfigError(
          f"{key}: unknown key (value {v!r}); allowed keys here are: "
          f"{', '.join(names)}")
    kwargs[k] = _build(hints[k], v, key)
  return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
  """The config as plain data (what is written next to a run)."""
  return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
  """`update` merged key by key onto `base`, as a new mapping that shares no
  container with either input."""
  out = copy.deepcopy(base)
  for k, v in update.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    else:
      out[k] = copy.deepcopy(v)
  return out


def _read_yaml(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict:
  """Reads a config file, following its `base:` chain."""
  path = path.resolve()
  if path in seen:
    raise ConfigError(f"base: {path} is included in a cycle")
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist")
  try:
    data = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
  if not isinstance(data, dict):
    raise ConfigError(f"config file {str(path)!r}: expected a mapping at top level")
  base = data.pop("base", None)
  if base is None:
    return data
  if not isinstance(base, str):
    raise ConfigError(f"base: got {base!r} in {path}; expected a file path")
  return _merge(_read_yaml(path.parent / base, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
  if "=" not in text:
    raise ConfigError(
        f"override {text!r}: expected dotted.key=value, e.g. optimizer.lr=1e-3")
  key, raw = text.split("=", 1)
  parts = key.strip().split(".")
  if not all(parts):
    raise ConfigError(f"override {text!r}: empty key component")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
  """A copy of `data` with the dotted overrides applied; `data` itself is
  left unchanged."""
  data = _merge({}, data)
  for text in overrides:
    parts, value = parse_override(text)
    node = data
    for p in parts[:-1]:
      child = node.get(p)
      if not isinstance(child, dict):
        child = {}
        node[p] = child
      node = child
    node[parts[-1]] = value
  return data


def from_dict(data: dict) -> Config:
  """Builds and validates a Config from plain data, merged key by key onto
  the defaults (so a mapping such as optimizer.param_groups keeps its
  default entries when a file or an override adds one)."""
  cfg = _build_dataclass(Config, _merge(to_dict(Config()), data), "")
  validate(cfg)
  return cfg


def load_config(path: str | os.PathLike | None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
  """Reads `path` (following `base:`), applies overrides, validates."""
  data = _read_yaml(pathlib.Path(path)) if path else {}
  return from_dict(apply_overrides(data, list(overrides)))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
  os.replace(tmp, path)


# --------------------------------------------------------------------------
# Validation of combinations
# --------------------------------------------------------------------------


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(f"{key}: got {value!r}; {allowed}")


def fault_steps(t: TrainConfig) -> frozenset[int]:
  """The steps of ``train.fault_nan_steps``."""
  text = str(t.fault_nan_steps).strip()
  return frozenset(int(x) for x in text.split(",")) if text else frozenset()


def _validate_memory(m: ModelConfig) -> None:
  """Memory-layer shapes that cannot work, named by key."""
  from ultramem_jax.memory_geometry import PlacementError, memory_geometry

  mem, k = m.memory, "model.memory"
  try:
    geo = memory_geometry(m)
  except PlacementError as e:
    hint = ("; quote skip pairs in YAML (an unquoted 2:5 reads as the number "
            "125)" if isinstance(mem.layers, int) else "")
    raise ConfigError(f"{k}.layers: got {mem.layers!r}; {e}{hint}") from None
  if not geo.placement:
    return
  for key in ("heads", "n_keys", "key_dim", "tucker_rank", "tucker_cores",
              "top_m", "value_expansion", "init_samples"):
    _require(getattr(mem, key) >= 1, f"{k}.{key}", getattr(mem, key),
             "must be a positive integer")
  for key in ("prefilter_k", "value_dim", "pre_value_dim"):
    _require(getattr(mem, key) >= 0, f"{k}.{key}", getattr(mem, key),
             "must be >= 0 (0 means derived)")
  for key in ("core_penalty", "core_penalty_tau", "key_balance",
              "value_init_std"):
    _require(getattr(mem, key) >= 0, f"{k}.{key}", getattr(mem, key),
             "must be >= 0")
  e = mem.value_expansion
  _require(math.isqrt(e) ** 2 == e, f"{k}.value_expansion", e,
           "must be a perfect square (sqrt(E) * n keys per side address E blocks)")
  ns = geo.keys_per_side
  _require(mem.k <= ns, f"{k}.prefilter_k", mem.k,
           f"K (0 means top_m={mem.top_m}) must be at most the {ns} keys per side")
  _require(mem.top_m <= mem.k * mem.k, f"{k}.top_m", mem.top_m,
           f"must be at most K*K = {mem.k * mem.k} (K = prefilter_k, or top_m "
           "when 0)")
  _require(mem.top_m <= ns * ns, f"{k}.top_m", mem.top_m,
           f"must be at most the {ns * ns} slots of the n*n grid")
  _require(m.value_dim % mem.tucker_cores == 0, f"{k}.value_dim", m.value_dim,
           f"must be divisible by tucker_cores={mem.tucker_cores} (multi-core "
           "scoring splits the value columns into equal chunks)")
  if mem.score == "sum":
    _require(mem.tucker_rank == 1 and mem.tucker_cores == 1, f"{k}.score",
             mem.score, "'sum' needs tucker_rank: 1 and tucker_cores: 1")
  if not mem.per_rank_queries:
    _require(mem.tucker_rank >= 2, f"{k}.per_rank_queries", False,
             "the released-code queries q[0, 0], q[0, 1] need tucker_rank >= 2")
  if mem.normalize_scores == "softmax":
    _require(mem.tucker_cores == 1, f"{k}.normalize_scores", "softmax",
             "needs tucker_cores: 1")
  if not mem.output_proj:
    _require(e * m.value_dim == m.d_model, f"{k}.output_proj", False,
             f"without Wo the read values are the output, so value_expansion * "
             f"value_dim = {e * m.value_dim} must equal d_model={m.d_model}")
  if mem.pre_value_dim and not mem.pre_value_proj:
    _require(mem.pre_value_dim == m.d_model, f"{k}.pre_value_dim",
             mem.pre_value_dim, f"must equal d_model={m.d_model} when "
             "pre_value_proj is false (the input is h itself)")
  if mem.share_values:
    _require(0.0 < mem.share_ratio <= 1.0, f"{k}.share_ratio", mem.share_ratio,
             "must lie in (0, 1]")
    _require(e == 1, f"{k}.value_expansion", e,
             "must be 1 when share_values is true")
  if mem.init == "paper" and mem.value_init == "eq26":
    _require(mem.pre_value_dim > 0, f"{k}.value_init", "eq26",
             "Eq. 26 needs pre-values (pre_value_dim > 0); use 'ultramem' or "
             "'fixed'")


def _validate_tasks(d: DataConfig, m: ModelConfig) -> None:
  """data.tasks and data.task_params: the mixture parses, every task and
  parameter exists, and a few instances of each task fit data.seq_len (in
  the token space of the vocabulary the run will most likely have; the
  data pipeline checks again with the real tokenizer)."""
  # Imported here: the task registry imports ConfigError from this module.
  import numpy as np  # noqa: PLC0415

  from ultramem_jax.tasks import (  # noqa: PLC0415
      TASKS, TaskError, TokenSpace, get_task, parse_mixture)

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
  _require(bool(names), "data.tasks", d.tasks,
           "names no task; use data.tasks='' to train on text alone")
  _require(d.task_val_rows > 0, "data.task_val_rows", d.task_val_rows,
           "must be a positive number of held-out task rows")
  if m.vocab_size:
    space = TokenSpace.for_vocab(m.vocab_size)
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


def validate(cfg: Config) -> None:
  m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
  for key, value in [("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
                     ("model.n_heads", m.n_heads), ("data.seq_len", d.seq_len),
                     ("data.batch_size", d.batch_size), ("train.steps", t.steps),
                     ("train.log_every", t.log_every),
                     ("train.eval_every", t.eval_every),
                     ("train.checkpoint_every", t.checkpoint_every),
                     ("train.max_to_keep", t.max_to_keep),
                     ("train.max_skipped_steps", t.max_skipped_steps)]:
    _require(value > 0, key, value, "must be a positive integer")
  _require(t.max_to_keep >= 2, "train.max_to_keep", t.max_to_keep,
           "must be at least 2, so that a damaged latest checkpoint has a "
           "predecessor to fall back on")
  _require(t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor",
           t.spike_factor, "must be 0 (off) or greater than 1")
  try:
    fault_steps(t)
  except ValueError:
    raise ConfigError(f"train.fault_nan_steps: got {t.fault_nan_steps!r}; "
                      "expected comma-separated step numbers, e.g. '5,6'") from None
  for key, value in [("model.vocab_size", m.vocab_size),
                     ("model.n_kv_heads", m.n_kv_heads),
                     ("model.head_dim", m.head_dim),
                     ("model.ffn.inner_dim", m.ffn.inner_dim),
                     ("optimizer.warmup_steps", o.warmup_steps),
                     ("train.eval_batches", t.eval_batches),
                     ("data.max_documents", d.max_documents)]:
    _require(value >= 0, key, value, "must be >= 0 (0 means derived)")
  if not m.head_dim:
    _require(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
             f"must divide model.d_model={m.d_model} (or set model.head_dim)")
  _require(m.n_heads % m.kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
           f"must divide model.n_heads={m.n_heads}")
  _require(m.attn_head_dim % 2 == 0, "model.head_dim", m.attn_head_dim,
           "rotary positions need an even head width")
  _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
  if m.ffn.kind == "moe":
    e = m.ffn.moe
    _require(e.num_experts >= 1, "model.ffn.moe.num_experts", e.num_experts,
             "must be a positive integer")
    _require(1 <= e.top_k <= e.num_experts, "model.ffn.moe.top_k", e.top_k,
             f"must lie in [1, model.ffn.moe.num_experts={e.num_experts}]")
    _require(e.expert_dim >= 0, "model.ffn.moe.expert_dim", e.expert_dim,
             "must be >= 0 (0 means d_model // 2)")
    _require(e.num_shared_experts >= 0, "model.ffn.moe.num_shared_experts",
             e.num_shared_experts, "must be >= 0")
    _require(e.block_size >= 1, "model.ffn.moe.block_size", e.block_size,
             "must be a positive integer")
    _require(e.capacity_factor >= 0, "model.ffn.moe.capacity_factor",
             e.capacity_factor, "must be >= 0 (0 means dropless)")
    for key in ("load_balance_coef", "z_loss_coef"):
      _require(getattr(e, key) >= 0, f"model.ffn.moe.{key}", getattr(e, key),
               "must be >= 0")
  _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
  _validate_memory(m)
  for key in ("dtype", "param_dtype"):
    if getattr(m, key) == "float64":
      import jax  # noqa: PLC0415 (only this check needs it)
      _require(bool(jax.config.jax_enable_x64), f"model.{key}", "float64",
               "needs 64-bit JAX (JAX_ENABLE_X64=1 or jax.enable_x64())")
  if d.tokenizer == "bpe":
    _require(d.bpe_vocab_size >= 260, "data.bpe_vocab_size", d.bpe_vocab_size,
             "must be at least 260 (256 byte symbols plus merges)")
  _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction,
           "must lie strictly between 0 and 1")
  _validate_tasks(d, m)
  _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
  _require(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio",
           o.min_lr_ratio, "must lie in [0, 1]")
  _require(0.0 <= o.b1 < 1.0, "optimizer.b1", o.b1, "must lie in [0, 1)")
  _require(0.0 <= o.b2 < 1.0, "optimizer.b2", o.b2, "must lie in [0, 1)")
  _require(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
  _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
           "must be >= 0")
  _require(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip,
           "must be >= 0 (0 disables clipping)")
  _require(o.warmup_steps < t.steps, "optimizer.warmup_steps", o.warmup_steps,
           f"must be smaller than train.steps={t.steps}")
  _require("default" in o.param_groups, "optimizer.param_groups",
           sorted(o.param_groups), "must define a 'default' group")
  for name, g in o.param_groups.items():
    _require(g.lr_multiplier > 0, f"optimizer.param_groups.{name}.lr_multiplier",
             g.lr_multiplier, "must be > 0")
    _require(g.multiplier_decay_steps >= 0,
             f"optimizer.param_groups.{name}.multiplier_decay_steps",
             g.multiplier_decay_steps, "must be >= 0")
  _require(bool(t.run_dir), "train.run_dir", t.run_dir, "must be a directory path")
  sizes = {name: getattr(cfg.mesh, name) for name in cfg.mesh.axis_names}
  for name, size in sizes.items():
    _require(size == -1 or size >= 1, f"mesh.{name}", size,
             "must be a positive device count or -1 (all remaining devices)")
  auto = [name for name, size in sizes.items() if size == -1]
  _require(len(auto) <= 1, f"mesh.{auto[-1] if auto else ''}", -1,
           f"only one mesh axis may be -1, got {auto}")
