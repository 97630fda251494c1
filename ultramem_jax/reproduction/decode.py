"""Claim 5 (memory access): the bytes one decode step reads, by inspect's
formula (``decode_cost.py``, spec section 7) for the MoE and UltraMemV2 of
each trained size and of the 227M pair, and the times the ``decode``
benchmark measured for the 227M pair, read from BENCHMARKS.md (the
``## decode`` section that ``python -m benchmarks.run --only decode``
writes). Nothing is timed here: the generator only reads."""

from __future__ import annotations

import pathlib
import re

from ultramem_jax.inspect import inspect_config
from ultramem_jax.training.config import load_config


def decode_bytes(pairs, repo: pathlib.Path, batches) -> list[dict]:
  """Per (size, batch): the parameter bytes a decode step of each model
  reads, their ratio and the KV cache at the config's context."""
  rows = []
  for label, moe, v2 in pairs:
    reports = {}
    for name, path in (("moe", moe), ("ultramem_v2", v2)):
      info = inspect_config(load_config(repo / path, []), batches=tuple(batches))
      reports[name] = {r["batch"]: r for r in info["decode"]}
      reports[name + "_total"] = info["non_embedding_params"]
    for b in batches:
      m, u = reports["moe"][b], reports["ultramem_v2"][b]
      rows.append({"size": label, "moe_config": moe, "v2_config": v2, "batch": b,
                   "moe_param_bytes": m["param_bytes"],
                   "v2_param_bytes": u["param_bytes"],
                   "ratio": m["param_bytes"] / u["param_bytes"],
                   "kv_cache_bytes": m["kv_cache_bytes"],
                   "context": m["context"]})
  return rows


def _table_after(lines: list[str], start: int) -> list[dict[str, str]]:
  """The first markdown table at or after line `start`, as dicts."""
  i = start
  while i < len(lines) and not lines[i].startswith("|"):
    i += 1
  if i + 1 >= len(lines):
    return []
  head = [c.strip() for c in lines[i].strip().strip("|").split("|")]
  rows = []
  for line in lines[i + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    rows.append(dict(zip(head, cells)))
  return rows


def benchmark_times(path: pathlib.Path) -> list[dict] | None:
  """Each machine's decode measurement in BENCHMARKS.md: {"machine",
  "command", "about" (the line with the date), "rows" (the "Time per decode
  step" table)}; None without the file or the section."""
  if not path.exists():
    return None
  lines = path.read_text().splitlines()
  try:
    start = lines.index("## decode")
  except ValueError:
    return None
  end = next((i for i in range(start + 1, len(lines))
              if lines[i].startswith("## ")), len(lines))
  out = []
  for i in range(start, end):
    if not lines[i].startswith("### "):
      continue
    sub_end = next((j for j in range(i + 1, end) if lines[j].startswith("### ")), end)
    block = lines[i:sub_end]
    timed = next((k for k, l in enumerate(block) if l.startswith("#### Time per decode step")),
                 None)
    if timed is None:
      continue
    command = next((re.sub(r"^- Command:\s*", "", l) for l in block
                    if l.startswith("- Command:")), "")
    about = next((l[2:] for l in block if re.match(r"- .*\d{4}-\d{2}-\d{2}", l)), "")
    out.append({"machine": lines[i][4:].strip(), "command": command.strip("` "),
                "about": about, "rows": _table_after(block, timed)})
  return out or None
