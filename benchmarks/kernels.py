"""kernels: the Pallas kernels against their pure-JAX references
(``pallas_kernels/bench.py``), on an accelerator only: on a CPU the kernels
run only interpreted, which says nothing of their speed, so this benchmark
is skipped there with a line saying so."""

from __future__ import annotations

import jax

from benchmarks.report import Result, Table
from pallas_kernels import bench

HEADER = ["config", "pallas ms", "xla ms", "speedup", "pallas GB/s", "% of peak"]
KINDS = ["absolute", "absolute", "ratio", "absolute", "ratio"]
QUICK_ARGS = ["--tokens", "256", "--rows", "16384", "--m", "32", "--dv", "192",
              "--dtypes", "float32", "--iters", "2", "--warmup", "1"]

DESCRIPTION = """\
The Pallas kernels (`pallas_kernels/`: `value_read` forward and backward,
`product_key_topk`) against their pure-JAX references, with
`pallas_kernels/bench.py`'s defaults: the paper's shapes, 8,192 tokens,
m 32-256, Dv 192-768, 1,048,576 rows, bf16 and fp32; formulas for the bytes
counted are in that file. The targets of the kernels issue (issue 6):
`value_read` forward at 70% or more of peak memory bandwidth on an
H100/H200 and at least 1.5x faster than the pure-JAX path; its backward at
least as fast as the pure-JAX path. `python -m pallas_kernels.bench` runs
the same measurement with its own options (`--help`) and writes its
subsections here too. On a CPU the kernels only run interpreted
(`python -m pallas_kernels.bench --interpret` with tiny shapes): that
checks the script, not the kernels' speed.
"""


def run(quick: bool = False) -> Result:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return Result("kernels", DESCRIPTION, skipped=(
        "no accelerator (JAX runs on CPU); the Pallas kernels are timed on a "
        "GPU or TPU only. Run `python -m benchmarks.run --only kernels` "
        "there."))
  a = bench.parse_args((QUICK_ARGS if quick else []) + ["--no-write"])
  peak, peak_label = bench.peak_bandwidth(device.device_kind)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  rows = bench.run(a, peak, limit)
  tables = [Table(kernel, HEADER, r, KINDS) for kernel, r in rows.items()]
  peak_text = f"{peak:.3g} B/s ({peak_label})" if peak else "unknown"
  setup = [f"{device.device_kind}; Pallas backend "
           f"{bench.resolve(a.backend)}; peak memory bandwidth {peak_text}",
           f"tokens {a.tokens}, rows {a.rows}, heads {a.heads}, m "
           f"{','.join(map(str, a.m))}, Dv {','.join(map(str, a.dv))}, "
           f"dtypes {','.join(a.dtypes)}; median of {a.iters} after "
           f"{a.warmup} warmup"]
  return Result("kernels", DESCRIPTION, setup, tables)
