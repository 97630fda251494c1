"""pod: what a pod run's settings cost on this machine. Compile time and
step time of the paper's UltraMemV2 and MoE configs (cut to 4 layers)
unrolled against scanned; XLA's peak memory of their train step under each
``model.remat`` policy, beside ``inspect --memory``'s estimate; and the MFU
of the tiny configs against this machine's measured matmul peak."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from tqdm import tqdm

from benchmarks.report import Result, Table
from benchmarks.timing import interleave, ms, pct
from benchmarks.train import QUICK, compiled_step, resolved_config
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.model.flops import config_flops
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.memory_estimate import (compiled_train_memory,
                                                   estimate_train_memory)

PAPER = (("MoE", "configs/paper/moe_227m.yaml"),
         ("UltraMemV2", "configs/paper/ultramem_v2_227m.yaml"))
TINY = (("dense", "configs/tiny_dense.yaml"), ("MoE", "configs/tiny_moe.yaml"),
        ("UltraMemV2", "configs/tiny_ultramem_v2.yaml"))
# 4 of the 20 blocks and a CPU-sized batch; the released init skips the
# paper init's calibration passes, which change no shape or cost.
SHORT = ["model.n_layers=4", "data.batch_size=2", "data.seq_len=128",
         "model.memory.init=released"]
POLICIES = ("none", "full", "save_dots", "save_dots_and_retrieval")
# --quick: one model, two policies, one tiny config (a check of the tables).
QUICK_PAPER, QUICK_POLICIES, QUICK_TINY = PAPER[1:], ("none", "full"), TINY[:1]

DESCRIPTION = """\
Three tables. **Scanned layers**: the train step (`training/step.py`) of
`configs/paper/moe_227m.yaml` and `configs/paper/ultramem_v2_227m.yaml`
cut to 4 blocks (batch 2 x 128, random tokens, `model.memory.init=released`
so no calibration pass runs), built unrolled and with
`model.scan_layers=true`: compile time (`lower().compile()`) and the
median step, the two layouts timed in turn. **Remat**: XLA's
`memory_analysis()` peak of the same train steps, scanned, under each
`model.remat` policy (compiled from shapes; nothing allocated), beside
`inspect --memory`'s estimate of the total (`training/memory_estimate.py`).
XLA's CPU backend schedules an unrolled model's recomputation early, so
remat's savings show on scanned layers (docs/pod.md). **MFU**: tokens/s of
the tiny configs' train step times the model's train FLOPs per token
(`model/flops.py`, 3x the forward), per second, against this machine's
peak measured as a float32 2048 x 2048 matmul.
"""


def scan_table(quick: bool) -> tuple[Table, dict]:
  rows, data = [], {}
  extra = QUICK + ["model.n_layers=2"] if quick else SHORT
  with use_mesh(single_device_mesh()):
    for name, path in tqdm(QUICK_PAPER if quick else PAPER,
                           desc="pod: scanned layers", leave=False):
      steps, compile_s = {}, {}
      for layout, scan in (("unrolled", "false"), ("scanned", "true")):
        cfg = resolved_config(path, extra + [f"model.scan_layers={scan}"])
        steps[layout], compile_s[layout], *_ = compiled_step(cfg)
      t = interleave(steps, rounds=1 if quick else 6, progress=False)
      u, s = t["unrolled"], t["scanned"]
      data[name] = {"compile_s": compile_s, "step_s": {"unrolled": u.median,
                                                       "scanned": s.median}}
      rows.append([name, f"{compile_s['unrolled']:.1f}", f"{compile_s['scanned']:.1f}",
                   f"{compile_s['unrolled'] / compile_s['scanned']:.2f}x",
                   ms(u.median), ms(s.median), pct(max(u.spread, s.spread)),
                   f"{s.median / u.median:.2f}x"])
      del steps
  table = Table(
      "Scanned layers (4 blocks)",
      ["model", "compile s, unrolled", "compile s, scanned",
       "compile, unrolled / scanned", "step ms, unrolled", "step ms, scanned",
       "spread", "step, scanned / unrolled"],
      rows, ["absolute", "absolute", "ratio", "absolute", "absolute", "",
             "ratio"])
  return table, data


def remat_table(quick: bool) -> tuple[Table, dict]:
  rows, data = [], {}
  extra = (QUICK + ["model.n_layers=2"] if quick else SHORT) + [
      "model.scan_layers=true"]
  mesh = single_device_mesh()
  cases = [(n, p, r) for n, p in (QUICK_PAPER if quick else PAPER)
           for r in (QUICK_POLICIES if quick else POLICIES)]
  for name, path, policy in tqdm(cases, desc="pod: remat", leave=False):
    cfg = resolved_config(path, extra + [f"model.remat={policy}"])
    peak = compiled_train_memory(cfg, mesh)["peak"]
    est = estimate_train_memory(cfg, abstract_model(cfg), devices=1).total
    data[(name, policy)] = {"xla_peak": peak, "estimate": est}
    base = data[(name, "none")]["xla_peak"]
    rows.append([name, policy, f"{peak / 2**20:,.0f}", f"{peak / base:.2f}x",
                 f"{est / 2**20:,.0f}", f"{est / peak:.2f}"])
  table = Table(
      "Peak memory of the train step by remat policy (scanned, 4 blocks)",
      ["model", "model.remat", "XLA peak MiB", "peak vs none",
       "estimate MiB", "estimate / XLA"],
      rows, ["", "", "ratio", "", "ratio"],
      ["XLA peak: arguments + outputs - aliased + temporaries of "
       "`compiled.memory_analysis()`; it depends on the XLA version and the "
       "backend, not on the machine's speed."])
  return table, data


@jax.jit
def _square(a):
  return a @ a


def cpu_peak_tflops(n: int = 2048) -> float:
  """TFLOP/s of a float32 n x n matmul, the peak MFU is measured against
  where no chip table applies."""
  a = jnp.ones((n, n), jnp.float32)
  t = interleave({"matmul": lambda: _square(a)}, rounds=5, progress=False)
  return 2 * n ** 3 / t["matmul"].median / 1e12


def mfu_table(quick: bool) -> tuple[Table, dict]:
  peak = cpu_peak_tflops(256 if quick else 2048)
  rows, data, steps, cfgs = [], {}, {}, {}
  tiny = QUICK_TINY if quick else TINY
  with use_mesh(single_device_mesh()):
    for name, path in tiny:
      cfgs[name] = resolved_config(path, QUICK if quick else [])
      steps[name], *_ = compiled_step(cfgs[name])
    t = interleave(steps, rounds=1 if quick else 8, progress=False)
  for name, _ in tiny:
    cfg = cfgs[name]
    tokens_s = cfg.data.batch_size * cfg.data.seq_len / t[name].median
    tflops = config_flops(cfg).train * tokens_s / 1e12
    data[name] = {"tokens_per_s": tokens_s, "tflops": tflops, "mfu": tflops / peak}
    rows.append([name, f"{tokens_s:,.0f}", f"{tflops:.4f}",
                 f"{100 * tflops / peak:.1f}%"])
  table = Table(
      "Model FLOPs utilisation of the tiny configs",
      ["config", "tokens/s", "model TFLOP/s", "MFU"],
      rows, ["absolute", "absolute", "ratio"],
      [f"Peak: a float32 matmul at {peak:.3f} TFLOP/s on this machine "
       "(what `train.peak_tflops` would be set to here)."])
  return table, {"peak_tflops": peak, **data}


def run(quick: bool = False) -> Result:
  tables, data = [], {}
  for part, fn in (("scan", scan_table), ("remat", remat_table),
                   ("mfu", mfu_table)):
    table, data[part] = fn(quick)
    tables.append(table)
  setup = ["configs: " + ", ".join(f"`{p}`" for _, p in PAPER)
           + (f" with `--quick` overrides {' '.join(QUICK)} model.n_layers=2"
              if quick else f" with {' '.join(SHORT)}"),
           "tiny configs: " + ", ".join(f"`{p}`" for _, p in TINY),
           f"{jax.devices()[0].platform}, one device"]
  return Result("pod", DESCRIPTION, setup, tables, data=data)
