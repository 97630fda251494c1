"""The ``model`` section: the Transformer's sizes, what fills its FFN slot
(dense SwiGLU or fine-grained MoE), and the rules they must satisfy. The
memory layers' own section is ``model/memory/config.py``."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

from ultramem_jax.config import require
from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model.memory.config import MemoryConfig, validate_memory


@dataclasses.dataclass(frozen=True)
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
  # E times the FLOPs), `gather` (each row's expert weights gathered into a
  # [rows, d, f] copy), `loop` (a loop over blocks of one expert's rows, at
  # most `block_size` and about the mean rows per expert, each reading its
  # expert's weights in place: reads each used expert once, for decoding),
  # or `auto` (loop up to 8 rows per expert on average, else blocked on
  # CPU and ragged_dot elsewhere).
  grouped_matmul: Literal["auto", "ragged_dot", "blocked", "gather",
                          "loop"] = "auto"
  block_size: int = 64


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """What fills the FFN slot of every block (``model.ffn.kind``)."""

  kind: Literal["dense", "moe"] = "dense"
  # Inner width of the dense SwiGLU FFN; 0 means 8/3 * d_model rounded up to 64.
  inner_dim: int = 0
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)



@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder-only Transformer (``model``); 0 means derived where noted."""

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
  # Activation rematerialisation of each block in training (nnx.remat with
  # jax.checkpoint_policies; model/remat.py): `none` keeps every activation
  # for the backward pass; `full` keeps only each block's input and
  # recomputes the rest; `save_dots` keeps the outputs of matrix
  # multiplications without batch dimensions (recomputes norms, activations,
  # softmaxes and attention's batched score products); `save_dots_and_retrieval`
  # also keeps the memory layer's retrieved slot indices and scores, so the
  # backward pass does not redo the top-k. Not part of the model: a run may
  # resume with another policy.
  remat: Literal["none", "full", "save_dots",
                 "save_dots_and_retrieval"] = "none"
  # Run the blocks as one scanned block over stacked parameters (nnx.scan;
  # model/scan.py): compile time independent of n_layers. Needs uniform
  # blocks: no memory layers in only some blocks, no skip layers, no
  # shared value table. Checkpoints hold the stacked layout, so a run
  # resumes only with the setting it was trained with.
  scan_layers: bool = False

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



def validate_model(m: ModelConfig) -> None:
  """Every rule of the ``model`` section, the memory layers' included."""
  for key in ("d_model", "n_layers", "n_heads"):
    require(getattr(m, key) > 0, f"model.{key}", getattr(m, key),
            "must be a positive integer")
  for key, value in [("model.vocab_size", m.vocab_size),
                     ("model.n_kv_heads", m.n_kv_heads),
                     ("model.head_dim", m.head_dim),
                     ("model.ffn.inner_dim", m.ffn.inner_dim)]:
    require(value >= 0, key, value, "must be >= 0 (0 means derived)")
  if not m.head_dim:
    require(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
            f"must divide model.d_model={m.d_model} (or set model.head_dim)")
  require(m.n_heads % m.kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
          f"must divide model.n_heads={m.n_heads}")
  require(m.attn_head_dim % 2 == 0, "model.head_dim", m.attn_head_dim,
          "rotary positions need an even head width")
  require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
  if m.ffn.kind == "moe":
    validate_moe(m.ffn.moe)
  require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
  validate_memory(m)
  if m.scan_layers:
    reason = scan_refusal(m)
    require(reason is None, "model.scan_layers", True,
            f"needs blocks that are all alike, but {reason}; set "
            "model.scan_layers=false")
  for key in ("dtype", "param_dtype"):
    if getattr(m, key) == "float64":
      require(bool(jax.config.jax_enable_x64), f"model.{key}", "float64",
              "needs 64-bit JAX (JAX_ENABLE_X64=1 or jax.enable_x64())")


def scan_refusal(m: ModelConfig) -> str | None:
  """Why the blocks of `m` are not all alike (so ``model.scan_layers``
  cannot stack them), or None when they are."""
  mem = m.memory
  if not mem.enabled:
    return None
  placement = memory_geometry(m).placement
  if mem.share_values:
    return ("model.memory.share_values=true gives every memory layer its own "
            "window of one shared table (UltraMem v1's shared tables)")
  if any(src != dst for src, dst in placement):
    return (f"model.memory.layers={mem.layers!r} holds skip layers that add "
            "their output after a later block (UltraMem v1)")
  if len(placement) != m.n_layers:
    return (f"model.memory.layers={mem.layers!r} puts memory layers in "
            f"{len(placement)} of the {m.n_layers} blocks (use 'all')")
  return None


def validate_moe(e: MoEConfig) -> None:
  """``model.ffn.moe`` (checked when ``model.ffn.kind`` is ``moe``)."""
  require(e.num_experts >= 1, "model.ffn.moe.num_experts", e.num_experts,
          "must be a positive integer")
  require(1 <= e.top_k <= e.num_experts, "model.ffn.moe.top_k", e.top_k,
          f"must lie in [1, model.ffn.moe.num_experts={e.num_experts}]")
  require(e.expert_dim >= 0, "model.ffn.moe.expert_dim", e.expert_dim,
          "must be >= 0 (0 means d_model // 2)")
  require(e.num_shared_experts >= 0, "model.ffn.moe.num_shared_experts",
          e.num_shared_experts, "must be >= 0")
  require(e.block_size >= 1, "model.ffn.moe.block_size", e.block_size,
          "must be a positive integer")
  require(e.capacity_factor >= 0, "model.ffn.moe.capacity_factor",
          e.capacity_factor, "must be >= 0 (0 means dropless)")
  for key in ("load_balance_coef", "z_loss_coef"):
    require(getattr(e, key) >= 0, f"model.ffn.moe.{key}", getattr(e, key),
            "must be >= 0")
