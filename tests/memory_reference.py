"""Slow float64 numpy reference of the product-key memory layer, for tests.

Written directly from the layer's equations (spec steps 1-7), with explicit
Python loops per token, per head and per kept slot, so that a vectorised JAX
implementation can be checked against it. It deliberately imports nothing from
`ultramem_jax`.

Ties in the top-K / top-m selections are broken by the lower index first
(a stable sort on the negated score); with random float64 inputs ties do not
occur in practice.
"""

import math

import numpy as np

Retrieved = tuple[int, int, float, list[float]]


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
  """RMSNorm of a single vector (or over the last axis)."""
  x = np.asarray(x, dtype=np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _activation(x: float, name: str) -> float:
  """Scalar value activation ("none", "gelu" (tanh), "gelu_exact" (erf),
  "relu", "silu")."""
  if name == "none":
    return x
  if name == "gelu_exact":
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
  if name == "gelu":
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi)
                                      * (x + 0.044715 * x ** 3)))
  if name == "relu":
    return max(x, 0.0)
  if name == "silu":
    return x / (1.0 + math.exp(-x))
  raise ValueError(f"unknown value_activation {name!r}")


def _silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _top_indices(scores: list[float], k: int) -> list[int]:
  """Indices of the k largest scores, largest first (ties: lower index)."""
  order = sorted(range(len(scores)), key=lambda idx: (-scores[idx], idx))
  return order[:k]


def reference_retrieval(params: dict, cfg: dict,
                        h_t: np.ndarray) -> list[list[Retrieved]]:
  """Kept (i, j, g, [g_c per core]) pairs of each head for one token.

  Args:
    params: the layer's parameters (numpy float64 arrays; perm is int).
    cfg: plain dict of the layer's configuration.
    h_t: [d] input of one token.

  Returns:
    A list over heads; each entry lists that head's m kept pairs sorted by g
    descending, as (row key i, column key j, g, [g_c for c in cores]).
  """
  h_t = np.asarray(h_t, dtype=np.float64)
  heads = cfg["heads"]
  r = cfg["tucker_rank"]
  eps = cfg["norm_eps"]
  k_pre = cfg["prefilter_k"]
  m = cfg["top_m"]
  score = cfg["score"]
  w_q = np.asarray(params["w_q"], dtype=np.float64)
  keys = np.asarray(params["keys"], dtype=np.float64)
  ns = keys.shape[2]
  if score == "sum" and r != 1:
    raise ValueError("score 'sum' needs tucker_rank 1")
  if m > k_pre * k_pre:
    raise ValueError("top_m must be <= prefilter_k ** 2")

  # 1. Queries: [Hq, 2, r, Dk], every [Dk] vector RMS-normalised.
  _, hq, _, rank_dim, dk = w_q.shape
  qf = np.zeros((hq, 2, rank_dim, dk))
  for qi in range(hq):
    for side in range(2):
      for t in range(rank_dim):
        raw = np.zeros(dk)
        for di in range(h_t.shape[0]):
          raw += h_t[di] * w_q[di, qi, side, t]
        qf[qi, side, t] = _rms_norm(raw, params["query_norm_scale"], eps)

  # 2. Keys, RMS-normalised over their Dk axis (axis 3).
  kn = np.zeros_like(keys)
  for hd in range(keys.shape[0]):
    for side in range(2):
      for j in range(ns):
        for t in range(keys.shape[4]):
          kn[hd, side, j, :, t] = _rms_norm(keys[hd, side, j, :, t],
                                            params["key_norm_scale"], eps)

  result = []
  for hd in range(heads):
    # 1. (cont.) Per-rank row/column queries of this head.
    qh = qf[0] if cfg["share_query"] else qf[hd]
    if cfg["per_rank_queries"]:
      q_row = [qh[0, t] for t in range(r)]
      q_col = [qh[1, t] for t in range(r)]
    else:
      if r < 2:
        raise ValueError("per_rank_queries=False needs tucker_rank >= 2")
      q_row = [qh[0, 0] for _ in range(r)]
      q_col = [qh[0, 1] for _ in range(r)]

    # 2. Sub-key scores S_row[j, t], S_col[j, t].
    s_row = np.zeros((ns, r))
    s_col = np.zeros((ns, r))
    for j in range(ns):
      for t in range(r):
        s_row[j, t] = float(np.dot(q_row[t], kn[hd, 0, j, :, t]))
        s_col[j, t] = float(np.dot(q_col[t], kn[hd, 1, j, :, t]))

    # 3. Pre-filter: top-K rows by a, top-K columns by b.
    a_scores, b_scores = [], []
    for j in range(ns):
      if score == "tucker":
        a_j = sum(params["u"][hd, t] * s_row[j, t] for t in range(r))
        b_j = sum(params["v"][hd, t] * s_col[j, t] for t in range(r))
      elif score == "sum":
        a_j, b_j = s_row[j, 0], s_col[j, 0]
      else:
        raise ValueError(f"unknown score {score!r}")
      a_scores.append(float(a_j))
      b_scores.append(float(b_j))
    rows = _top_indices(a_scores, k_pre)
    cols = _top_indices(b_scores, k_pre)

    # 4. Re-score the K x K grid, keep the m best pairs.
    grid = []
    for i in rows:
      for j in cols:
        if score == "tucker":
          g_cores = [float(s_row[i] @ params["cores"][c, hd] @ s_col[j])
                     for c in range(cfg["tucker_cores"])]
          g = float(sum(g_cores))
        else:
          g = float(s_row[i, 0] + s_col[j, 0])
          g_cores = [g]
        grid.append((i, j, g, g_cores))
    kept_idx = _top_indices([entry[2] for entry in grid], m)
    result.append([grid[idx] for idx in kept_idx])
  return result


def _address(params: dict, cfg: dict, i: int, j: int,
             ns: int) -> tuple[int, int]:
  """Physical row p and value block e of grid pair (i, j) (step 5).

  Key expansion X (the released code's mem_key_expand_time): the grid has
  X*X times as many virtual slots as the value_num rows; the permuted index
  q names group q // value_num and row (q % value_num + offset) % table
  (the fold). The released code sums the X*X groups (value_expand_time 1);
  with value expansion E on top, groups E*X*X in all, group g feeds value
  block g // (X*X) and the X*X groups of one block are summed.
  """
  x = cfg.get("key_expansion", 1)
  s = i * ns + j
  q = int(params["perm"][s])
  if cfg.get("share_values", False):
    if cfg["value_expansion"] != 1:
      raise ValueError("shared values need value_expansion 1")
    value_num = cfg["rows_per_layer"]
    if q // value_num >= x * x:
      raise ValueError(f"group {q // value_num} out of range")
    p = ((q % value_num) + cfg["offset"]) % cfg["table_rows"]
    return p, 0
  value_num = cfg["n_keys"] * cfg["n_keys"]
  group = q // value_num
  if group >= cfg["value_expansion"] * x * x:
    raise ValueError(f"group {group} out of range")
  return q % value_num, group // (x * x)


def reference_memory(params: dict, cfg: dict, h: np.ndarray) -> np.ndarray:
  """Memory layer output, one token at a time.

  Args:
    params: the layer's parameters (numpy arrays).
    cfg: plain dict of the layer's configuration.
    h: [T, d] float64 inputs.

  Returns:
    [T, d] float64 outputs.
  """
  h = np.asarray(h, dtype=np.float64)
  heads = cfg["heads"]
  hc = cfg["tucker_cores"] if cfg["score"] == "tucker" else 1
  e_blocks = cfg["value_expansion"]
  dv = cfg["value_dim"]
  dp = cfg["pre_value_dim"]
  ns = params["keys"].shape[2]
  values = np.asarray(params["values"], dtype=np.float64)
  if dv % hc:
    raise ValueError("value_dim must split into tucker_cores chunks")
  chunk = dv // hc
  if cfg["normalize_scores"] == "softmax" and hc != 1:
    raise ValueError("softmax weights need a single core")

  outs = []
  for t_idx in range(h.shape[0]):
    h_t = h[t_idx]
    kept = reference_retrieval(params, cfg, h_t)

    # 6. Pre-value input z.
    z = None
    if dp > 0:
      if cfg["pre_value_proj"]:
        z = h_t @ params["w_p"]
      else:
        z = h_t
        if z.shape[0] != dp:
          raise ValueError("pre_value_proj=False needs pre_value_dim == d")

    o = np.zeros((e_blocks, dv))
    for hd in range(heads):
      pairs = kept[hd]
      if cfg["normalize_scores"] == "softmax":
        g_max = max(entry[2] for entry in pairs)
        denom = sum(math.exp(entry[2] - g_max) for entry in pairs)
      for i, j, g, g_cores in pairs:
        # 5. Addressing.
        p, e = _address(params, cfg, i, j, ns)
        # 6. Pre-value activation a_k.
        if dp > 0:
          a_k = float(np.dot(z, params["pre_values"][p]))
        else:
          a_k = 1.0
        a_k = _activation(a_k, cfg["value_activation"])
        # 6. Score weights w_{k,c}.
        if cfg["normalize_scores"] == "softmax":
          weights = [math.exp(g - g_max) / denom]
        elif cfg["normalize_scores"] == "none":
          weights = list(g_cores)
        else:
          raise ValueError(f"unknown normalize_scores "
                           f"{cfg['normalize_scores']!r}")
        # 6. Multi-core scoring: chunk c of the row weighted by w_{k,c}.
        for c in range(hc):
          lo, hi = c * chunk, (c + 1) * chunk
          o[e, lo:hi] += a_k * weights[c] * values[p, lo:hi]

    # 7. Output: flatten block-major, optional gate, optional projection.
    flat = o.reshape(e_blocks * dv)
    if params.get("w_g") is not None:
      flat = flat * _silu(h_t @ params["w_g"])
    if params.get("w_o") is not None:
      out_t = flat @ params["w_o"]
    else:
      out_t = flat
    outs.append(out_t)
  return np.stack(outs)
