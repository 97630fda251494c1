"""The ``model.memory`` section: product-key memory layers (UltraMemV2,
UltraMem v1, Memory+, PKM and PEER are settings of it) and the shapes that
cannot work, checked before anything is built."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from ultramem_jax.config import ConfigError, require
from ultramem_jax.memory_geometry import PlacementError, memory_geometry


@dataclasses.dataclass(frozen=True)
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
  value_activation: Literal["none", "gelu", "gelu_exact", "relu", "silu"] = "none"
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
  # X: key expansion (the released code's mem_key_expand_time): X*n keys per
  # side (times sqrt(E)) address X*X times as many virtual slots as rows; a
  # slot's permuted index folds onto a row modulo the rows, and the X*X
  # blocks' weighted sums are added (not concatenated: Wo stays E*Dv -> d).
  # 1 disables it. See docs/memory-layers.md, "Key expansion".
  key_expansion: int = 1
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
  # Where the value and pre-value tables live at inference (decode and
  # evaluation; training keeps them on the device): "device", or "host"
  # (``pinned_host`` memory; each step moves only the rows its tokens kept,
  # model/memory/host_read.py). Not part of the model: a trained run may be
  # evaluated with either.
  table_memory: Literal["device", "host"] = "device"
  # With table_memory=host, what runs on the host: "rows" (the gather; the
  # kept rows are copied to the device), "sum" (the gather, pre-value dots
  # and weighted sum; only the read output is copied) or "auto"
  # (host_read.AUTO_HOST_READ, "sum").
  host_read: Literal["rows", "sum", "auto"] = "auto"

  @property
  def enabled(self) -> bool:
    return bool(str(self.layers).strip())

  @property
  def k(self) -> int:
    return self.prefilter_k or self.top_m



def validate_memory(m) -> None:
  """Memory-layer shapes that cannot work, named by key. `m` is the
  ``ModelConfig`` holding the section (d_model, n_layers and value_dim take
  part in the checks). Settings that exclude one another are refused where
  the stages are built, by ``model/memory/recipe.memory_recipe``, which
  ``training/config.validate`` calls next."""
  mem, k = m.memory, "model.memory"
  try:
    geo = memory_geometry(m)
  except PlacementError as e:
    hint = ("; quote skip pairs in YAML (an unquoted 2:5 reads as the number "
            "125)" if isinstance(mem.layers, int) else "")
    raise ConfigError(f"{k}.layers: got {mem.layers!r}; {e}{hint}") from None
  if not geo.placement:
    return
  _check_sizes(mem, geo.keys_per_side)
  if mem.table_memory == "host" and m.scan_layers:
    raise ConfigError(
        f"{k}.table_memory: got 'host' with model.scan_layers=true; host "
        "tables are read per layer, and a scanned stack slices its tables on "
        "the device: evaluate with model.scan_layers=false (a scanned run's "
        "checkpoint is stacked, so train unrolled to use host tables)")


def _check_sizes(mem: MemoryConfig, ns: int) -> None:
  """Counts that must be positive or >= 0, and the limits the grid of `ns`
  keys per side puts on K and top_m."""
  k = "model.memory"
  for key in ("heads", "n_keys", "key_dim", "tucker_rank", "tucker_cores",
              "top_m", "value_expansion", "key_expansion",
              "init_samples"):
    require(getattr(mem, key) >= 1, f"{k}.{key}", getattr(mem, key),
            "must be a positive integer")
  for key in ("prefilter_k", "value_dim", "pre_value_dim"):
    require(getattr(mem, key) >= 0, f"{k}.{key}", getattr(mem, key),
            "must be >= 0 (0 means derived)")
  for key in ("core_penalty", "core_penalty_tau", "key_balance",
              "value_init_std"):
    require(getattr(mem, key) >= 0, f"{k}.{key}", getattr(mem, key),
            "must be >= 0")
  e = mem.value_expansion
  require(math.isqrt(e) ** 2 == e, f"{k}.value_expansion", e,
          "must be a perfect square (sqrt(E) * n keys per side address E blocks)")
  require(mem.k <= ns, f"{k}.prefilter_k", mem.k,
          f"K (0 means top_m={mem.top_m}) must be at most the {ns} keys per side")
  require(mem.top_m <= mem.k * mem.k, f"{k}.top_m", mem.top_m,
          f"must be at most K*K = {mem.k * mem.k} (K = prefilter_k, or top_m "
          "when 0)")
  require(mem.top_m <= ns * ns, f"{k}.top_m", mem.top_m,
          f"must be at most the {ns * ns} slots of the n*n grid")
