"""The memory variants the tests run, in one table.

:data:`VARIANTS` holds each variant of spec sections 2 and 6 as
``model.memory`` settings at tiny shapes (K < keys per side everywhere, so
the pre-filter matters). The layer tests build layers from them; the kernel
tests read the same variants as value-read cases (:data:`READ_CASES`: cores,
pre-values, activation, value blocks). :data:`TRAIN_V2` and :data:`TRAIN_V1`
are the two variants the whole-train-step tests run, as override lists.
"""

from __future__ import annotations

VARIANTS = {
    "ultramem_v2": dict(layers="all", n_keys=6, key_dim=4, top_m=5,
                        prefilter_k=4, value_dim=8, pre_value_dim=6),
    "ultramem_v2_released_queries": dict(
        layers="all", n_keys=6, key_dim=4, top_m=5, prefilter_k=4,
        value_dim=8, pre_value_dim=6, per_rank_queries=False, tucker_rank=3,
        tucker_cores=2),
    "ultramem_v2_gelu_4cores": dict(
        layers="all", n_keys=5, key_dim=4, top_m=6, prefilter_k=4, value_dim=8,
        pre_value_dim=4, tucker_cores=4, value_activation="gelu"),
    "ultramem_v1": dict(layers="0:1/1:2", n_keys=3, key_dim=4, top_m=4,
                        prefilter_k=3, heads=2, share_query=True,
                        value_expansion=4, value_dim=6, value_init="ultramem"),
    # Tucker scoring with more cores than two and no pre-values.
    "ultramem_4cores": dict(layers="all", n_keys=5, key_dim=4, top_m=6,
                            prefilter_k=4, value_dim=8, tucker_cores=4,
                            value_init="ultramem"),
    # Key expansion X (released mem_key_expand_time): X*n keys per side,
    # X*X slots folded onto each row and summed; alone, with v1's value
    # blocks on top, and on a shared ring.
    "ultramem_v2_keyexp2": dict(layers="all", n_keys=3, key_dim=4, top_m=5,
                                prefilter_k=4, value_dim=8, pre_value_dim=6,
                                key_expansion=2),
    "ultramem_v1_keyexp3": dict(layers="all", n_keys=2, key_dim=4, top_m=6,
                                prefilter_k=5, heads=2, share_query=True,
                                value_expansion=4, key_expansion=3,
                                value_dim=6, value_init="ultramem"),
    "ultramem_v2_keyexp2_shared": dict(
        layers="0,1", n_keys=3, key_dim=4, top_m=5, prefilter_k=4,
        value_dim=8, pre_value_dim=6, key_expansion=2, share_values=True,
        share_ratio=1.0, per_rank_queries=False),
    "memory_plus": dict(layers="0,1,2", replace_ffn=True, score="sum",
                        tucker_rank=1, tucker_cores=1, n_keys=4, key_dim=4,
                        top_m=3, prefilter_k=3, heads=2,
                        normalize_scores="softmax", output_gate=True,
                        value_dim=8, share_values=True, share_ratio=0.5,
                        value_init="fixed"),
    "pkm": dict(layers="1", replace_ffn=True, score="sum", tucker_rank=1,
                tucker_cores=1, n_keys=5, key_dim=4, top_m=4, prefilter_k=3,
                heads=2, normalize_scores="softmax", output_proj=False,
                value_dim=16, value_init="fixed"),
    "peer": dict(layers="1", replace_ffn=True, score="sum", tucker_rank=1,
                 tucker_cores=1, n_keys=5, key_dim=4, top_m=4, heads=3,
                 normalize_scores="softmax", output_proj=False, value_dim=16,
                 pre_value_dim=16, pre_value_proj=False, value_activation="gelu",
                 value_init="fixed"),
}

# The spec's variant (recipe name) each entry builds.
RECIPE_NAMES = {
    "ultramem_v2": "UltraMemV2", "ultramem_v2_released_queries": "UltraMemV2",
    "ultramem_v2_gelu_4cores": "UltraMemV2", "ultramem_v1": "UltraMem v1",
    "ultramem_4cores": "UltraMem v1", "ultramem_v2_keyexp2": "UltraMemV2",
    "ultramem_v1_keyexp3": "UltraMem v1",
    "ultramem_v2_keyexp2_shared": "UltraMemV2",
    "memory_plus": "Memory+", "pkm": "PKM",
    "peer": "PEER",
}


def read_case(memory: dict) -> tuple[int, bool, str, int]:
  """(cores hc, pre-values, activation, value blocks E) of step 6."""
  return (memory.get("tucker_cores", 2), bool(memory.get("pre_value_dim", 0)),
          memory.get("value_activation", "none"), memory.get("value_expansion", 1))


def _read_cases() -> list[tuple[str, int, bool, str, int]]:
  """One (name, hc, pre, activation, E) per distinct read, first name kept."""
  seen, cases = set(), []
  for name, memory in VARIANTS.items():
    case = read_case(memory)
    if case not in seen:
      seen.add(case)
      cases.append((name, *case))
  return cases


READ_CASES = _read_cases()


def overrides(memory: dict) -> list[str]:
  """``model.memory.<key>=<value>`` command-line overrides of `memory`."""
  text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
  return [f"model.memory.{k}={text(v)}" for k, v in memory.items()]


# The whole-train-step variants (a d_model = 32 trunk).
TRAIN_V2 = overrides(dict(layers="all", n_keys=8, key_dim=8, top_m=4,
                          value_dim=16, pre_value_dim=16))
TRAIN_V1 = overrides(dict(layers="0:1", heads=2, share_query=True, n_keys=6,
                          key_dim=8, top_m=4, value_dim=8, value_expansion=4,
                          value_init="ultramem"))
