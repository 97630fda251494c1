"""Times the Pallas kernels against their pure-JAX references.

Run as ``python -m pallas_kernels.bench`` on a TPU or an NVIDIA GPU. For every
configuration it times, each function compiled once (ahead of time) and then
run ``--warmup`` times untimed and ``--iters`` times timed (median, waiting on
``jax.block_until_ready``):

- ``value_read`` forward: ``value_read(slots, weights, V, z=z, pre_values=P,
  activation="none")`` vs :func:`value_read_reference`;
- ``value_read`` forward+backward: ``jax.grad`` of ``sum(out * ct)`` with
  respect to weights, V, z and P;
- ``product_key_topk`` forward and forward+backward (grad w.r.t. q and keys
  of ``sum(scores * ct)``) vs :func:`product_key_topk_reference`.

Default shapes are the paper's: 8192 tokens per device, m in {32, 64, 128,
256} kept slots per token and head (S = heads * m slots per token), value
width Dv in {192, 384, 768} with pre-value width Dp = Dv, tables of R =
1,048,576 rows, hc = 2 cores, bf16 and fp32. product_key_topk: G = 2 * heads
(head, side) groups, n = isqrt(R) = 1024 keys per side, r = 2, Dk = 128,
K = min(m, n).

Achieved bandwidth is bytes / (median pallas time), with bytes (N tokens,
``it`` the dtype's itemsize; indices and scores counted as 4 bytes each):

- value_read forward: ``N*S*(Dv+Dp)*it`` (rows read) ``+ N*Dv*it`` (output)
  ``+ N*S*(4 + hc*4)`` (slot indices and per-core scores);
- value_read forward+backward: the forward's bytes ``+ 2*N*S*(Dv+Dp)*it``:
  the rows read again (the row dots read V, the dz kernel reads P) and the
  scatter-add writes of the row gradients dV and dP;
- product_key_topk forward: ``(G*N + G*n)*r*Dk*it`` (queries and keys read)
  ``+ G*N*K*(4 + r*4)`` (indices and scores written); forward+backward adds
  ``2*(G*N + G*n)*r*Dk*it`` (q and keys read again, dq and dk written)
  ``+ G*N*K*r*4`` (the scores' cotangent). This kernel does
  ``2*G*N*n*r*Dk`` flops and is compute-bound: its % of peak bandwidth is
  low by design.

The percentage is of the device's peak memory bandwidth (``PEAK_BANDWIDTH``,
matched on ``jax.devices()[0].device_kind``; unknown devices get none).
Results are printed as markdown tables and written to ``BENCHMARKS.md`` under
``## kernels`` (the section ``python -m benchmarks.run`` writes too), one
``###`` subsection per device kind and mode,
replacing an earlier one for the same pair (``--out`` another file,
``--no-write`` none). On a CPU the kernels only run with ``--interpret`` and
tiny shapes, to check this script; those timings are not kernel performance.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from pallas_kernels.backend import resolve
from pallas_kernels.product_key_topk import product_key_topk
from pallas_kernels.reference import (product_key_topk_reference,
                                      value_read_reference)
from pallas_kernels.value_read import value_read

HC = 2          # cores per value row (column chunks of Dv)
RANKS = 2       # r: ranks of the product-key scores
KEY_DIM = 128   # Dk
PALLAS_HEADING = "## kernels"
HEADING_RE = re.compile(r"^### (?P<kind>.+) \((?P<mode>compiled|interpret)\) - "
                        r"\d{4}-\d{2}-\d{2}\s*$")
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32",
          "f32": "float32", "float32": "float32", "fp16": "float16",
          "float16": "float16"}
SHORT = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}

# (substrings of device_kind, all of which must match; bytes/s; label).
# First match wins, so the more specific entries come first.
PEAK_BANDWIDTH = (
    (("H100", "PCIe"), 2.0e12, "H100 PCIe"),
    (("H100",), 3.35e12, "H100 SXM"),
    (("H200",), 4.8e12, "H200"),
    (("A100", "80GB"), 2.039e12, "A100 80GB"),
    (("A100",), 2.0e12, "A100"),
    (("TPU v4",), 1.2e12, "TPU v4"),
    (("v5 lite",), 8.19e11, "TPU v5e"),
    (("v5e",), 8.19e11, "TPU v5e"),
    (("v5p",), 2.76e12, "TPU v5p"),
    (("TPU v5",), 2.76e12, "TPU v5p"),
    (("v6 lite",), 1.64e12, "TPU v6e"),
    (("v6e",), 1.64e12, "TPU v6e"),
)


def peak_bandwidth(kind: str) -> tuple[float | None, str]:
  """Peak memory bandwidth (bytes/s) and its label for a device kind."""
  for parts, peak, label in PEAK_BANDWIDTH:
    if all(p.lower() in kind.lower() for p in parts):
      return peak, label
  return None, "unknown"


def time_ms(fn: Callable, args: tuple, warmup: int, iters: int) -> float:
  """Median wall time in ms of the compiled `fn(*args)`."""
  compiled = jax.jit(fn).lower(*args).compile()
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def value_read_case(key, a, dtype, s: int, dv: int):
  """Inputs, functions {pass: (pallas, xla)} and bytes moved per pass."""
  n, rows, it = a.tokens, a.rows, jnp.dtype(dtype).itemsize
  dp = dv
  k = jax.random.split(key, 6)
  slots = jax.random.randint(k[0], (n, s), 0, rows, jnp.int32)
  slots = slots.at[-1, -1].set(slots[0, 0])   # at least one duplicate row
  args = (slots,
          jax.random.uniform(k[1], (n, s, HC), dtype),
          (0.02 * jax.random.normal(k[2], (rows, dv))).astype(dtype),
          jax.random.normal(k[3], (n, dp), dtype),
          (0.02 * jax.random.normal(k[4], (rows, dp))).astype(dtype),
          jax.random.normal(k[5], (n, dv), jnp.float32))
  kw = dict(activation="none", dtype=dtype)
  pallas = lambda sl, w, v, z, p: value_read(
      sl, w, v, z=z, pre_values=p, backend=a.backend, interpret=a.interpret, **kw)
  xla = lambda sl, w, v, z, p: value_read_reference(sl, w, v, z=z, pre_values=p, **kw)

  def fwd(f):
    return lambda sl, w, v, z, p, ct: f(sl, w, v, z, p)

  def grad(f):
    loss = lambda sl, w, v, z, p, ct: jnp.sum(f(sl, w, v, z, p).astype(jnp.float32) * ct)
    return jax.grad(loss, argnums=(1, 2, 3, 4))

  fwd_bytes = n * s * (dv + dp) * it + n * dv * it + n * s * (4 + HC * 4)
  nbytes = {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + 2 * n * s * (dv + dp) * it}
  fns = {"fwd": (fwd(pallas), fwd(xla)), "fwd+bwd": (grad(pallas), grad(xla))}
  return args, fns, nbytes


def topk_case(key, a, dtype, m: int):
  """Inputs, functions {pass: (pallas, xla)} and bytes moved per pass."""
  g, n_tok, it = 2 * a.heads, a.tokens, jnp.dtype(dtype).itemsize
  n = math.isqrt(a.rows)
  k = min(m, n)
  kq, kk, ku, kc = jax.random.split(key, 4)
  keys = jax.random.normal(kk, (g, n, RANKS, KEY_DIM))
  keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
  args = (jax.random.normal(kq, (g, n_tok, RANKS, KEY_DIM), dtype),
          keys.astype(dtype),
          jax.random.uniform(ku, (g, RANKS), dtype, 0.5, 1.5),
          jax.random.normal(kc, (g, n_tok, k, RANKS), jnp.float32))
  pallas = lambda q, kt, u: product_key_topk(
      q, kt, u, k, backend=a.backend, interpret=a.interpret)
  xla = lambda q, kt, u: product_key_topk_reference(q, kt, u, k)

  def fwd(f):
    return lambda q, kt, u, ct: f(q, kt, u)

  def grad(f):
    loss = lambda q, kt, u, ct: jnp.sum(f(q, kt, u)[1] * ct)
    return jax.grad(loss, argnums=(0, 1))

  qk = (g * n_tok + g * n) * RANKS * KEY_DIM * it
  fwd_bytes = qk + g * n_tok * k * (4 + RANKS * 4)
  nbytes = {"fwd": fwd_bytes,
            "fwd+bwd": fwd_bytes + 2 * qk + g * n_tok * k * RANKS * 4}
  fns = {"fwd": (fwd(pallas), fwd(xla)), "fwd+bwd": (grad(pallas), grad(xla))}
  return args, fns, nbytes


def memory_estimate(kernel: str, a, itemsize: int, s: int, dv: int | None) -> int:
  """Rough peak device bytes of a configuration, before allocating it."""
  if kernel == "value_read":
    # Tables and their f32 gradients, plus the XLA path's gathered f32 rows
    # (forward rows, their cotangents, the scatter's updates); Dp = Dv.
    return a.rows * 2 * dv * (2 * itemsize + 4) + 3 * a.tokens * s * 2 * dv * 4
  # The XLA path's score matrices [G, N, n, r] and pre-filter, forward and
  # backward, plus queries, keys and their gradients.
  g, n = 2 * a.heads, math.isqrt(a.rows)
  return (2 * g * a.tokens * n * (RANKS + 1) * 4
          + 3 * g * (a.tokens + n) * RANKS * KEY_DIM * itemsize)


def configs(a) -> list[tuple]:
  """(kernel, dtype, m, Dv or None) for every configuration to time."""
  return [(kernel, dtype, m, dv) for kernel in a.kernels for dtype in a.dtypes
          for m in a.m for dv in (a.dv if kernel == "value_read" else [None])]


def run(a, peak: float | None, limit: int | None) -> dict[str, list[list[str]]]:
  """Measures every configuration; returns markdown rows per kernel."""
  tables = {kernel: [] for kernel in a.kernels}
  key = jax.random.key(a.seed)
  for i, (kernel, dtype, m, dv) in enumerate(tqdm(configs(a), desc="configs")):
    case_key = jax.random.fold_in(key, i)
    s, n = a.heads * m, math.isqrt(a.rows)
    if kernel == "value_read":
      label = f"{SHORT[dtype]} m={m}" + (f" S={s}" if a.heads > 1 else "") + f" Dv={dv}"
    else:
      label = f"{SHORT[dtype]} K={min(m, n)} n={n} G={2 * a.heads}"
    memory = memory_estimate(kernel, a, jnp.dtype(dtype).itemsize, s, dv)
    if limit is not None and memory > 0.9 * limit:
      note = f"skipped: needs ~{memory / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB"
      tqdm.write(f"{kernel} {label}: {note}")
      tables[kernel].append([label, note, "", "", "", ""])
      continue
    if kernel == "value_read":
      args, fns, nbytes = value_read_case(case_key, a, dtype, s, dv)
    else:
      args, fns, nbytes = topk_case(case_key, a, dtype, m)
    for name, (pallas_fn, xla_fn) in fns.items():
      row = [f"{label} {name}"]
      try:
        p_ms = time_ms(pallas_fn, args, a.warmup, a.iters)
        x_ms = time_ms(xla_fn, args, a.warmup, a.iters)
      except Exception as e:  # pylint: disable=broad-except
        tqdm.write(f"{kernel} {row[0]}: failed: {type(e).__name__}: "
                   f"{(str(e).splitlines() or [''])[0][:160]}")
        tables[kernel].append(row + [f"failed ({type(e).__name__})", "", "", "", ""])
        continue
      rate = nbytes[name] / (p_ms * 1e-3)
      pct = f"{100 * rate / peak:.1f}" if peak else "n/a"
      tables[kernel].append(row + [f"{p_ms:.4g}", f"{x_ms:.4g}",
                                   f"{x_ms / p_ms:.3g}x", f"{rate / 1e9:.4g}", pct])
    del args, fns
  return tables


def section(a, kind: str, mode: str, peak: float | None, peak_label: str,
            tables: dict[str, list[list[str]]]) -> str:
  """The markdown subsection of this run."""
  command = " ".join(["python -m pallas_kernels.bench"] +
                      [shlex.quote(x) for x in sys.argv[1:]])
  platform = jax.devices()[0].platform
  lines = [f"### {kind} ({mode}) - {datetime.date.today().isoformat()}", ""]
  if a.interpret:
    where = "on CPU" if platform == "cpu" else f"on {platform}"
    lines += [f"**interpret mode {where}: timings are not kernel performance.**", ""]
  peak_text = f"{peak:.3g} B/s ({peak_label})" if peak else "unknown"
  lines += [f"- Command: `{command}`",
            f"- JAX {jax.__version__}, platform {platform}, Pallas backend "
            f"{resolve(a.backend)}; peak memory bandwidth {peak_text}",
            f"- tokens {a.tokens}, rows {a.rows}, heads {a.heads}, hc {HC}, "
            f"r {RANKS}, Dk {KEY_DIM}, Dp = Dv; median of {a.iters} after "
            f"{a.warmup} warmup",
            "- GB/s: bytes of rows read and written per second of the pallas "
            "kernel (formulas in `pallas_kernels/bench.py`)"]
  header = ["config", "pallas ms", "xla ms", "speedup", "pallas GB/s", "% of peak"]
  for kernel, rows in tables.items():
    lines += ["", f"#### {kernel}", "", "| " + " | ".join(header) + " |",
              "|" + "|".join(["---"] + ["---:"] * 5) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def update_markdown(path: Path, text: str, kind: str, mode: str) -> None:
  """Puts `text` under ``## kernels`` of `path`, replacing an earlier
  subsection for the same device kind and mode; everything else is kept."""
  lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks"]
  new = text.rstrip("\n").splitlines()
  if PALLAS_HEADING not in lines:
    while lines and not lines[-1].strip():
      lines.pop()
    lines += ["", PALLAS_HEADING]
  top = lines.index(PALLAS_HEADING)
  end = next((i for i in range(top + 1, len(lines))
              if re.match(r"^#{1,2} ", lines[i])), len(lines))
  subs = [i for i in range(top + 1, end) if lines[i].startswith("### ")]
  for i in subs:
    match = HEADING_RE.match(lines[i])
    if match and match["kind"] == kind and match["mode"] == mode:
      stop = next((j for j in subs if j > i), end)
      lines[i:stop] = new + [""]
      break
  else:
    start = end
    while start > top + 1 and not lines[start - 1].strip():
      start -= 1
    lines[start:end] = [""] + new + [""]
  path.write_text("\n".join(lines).rstrip("\n") + "\n")


def comma_list(cast: Callable) -> Callable[[str], list]:
  return lambda text: [cast(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=8192, help="tokens per device")
  p.add_argument("--rows", type=int, default=1 << 20, help="table rows R")
  p.add_argument("--m", type=comma_list(int), default=[32, 64, 128, 256],
                 help="kept slots per token and head (comma list)")
  p.add_argument("--dv", type=comma_list(int), default=[192, 384, 768],
                 help="value widths (comma list); Dp = Dv")
  p.add_argument("--heads", type=int, default=1)
  p.add_argument("--dtypes", type=comma_list(str), default=["bf16", "fp32"])
  p.add_argument("--kernels", type=comma_list(str),
                 default=["value_read", "product_key_topk"])
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--backend", choices=("tpu", "triton", "default"), default="default")
  p.add_argument("--interpret", action="store_true",
                 help="run Pallas in interpret mode (tiny shapes, CPU checks)")
  p.add_argument("--out", type=Path,
                 default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md",
                 help="markdown file to update (default: BENCHMARKS.md)")
  p.add_argument("--no-write", action="store_true", help="only print")
  a = p.parse_args(argv)
  if any(d.lower() not in DTYPES for d in a.dtypes):
    p.error(f"unknown --dtypes {a.dtypes}; use {sorted(DTYPES)}")
  a.dtypes = [DTYPES[d.lower()] for d in a.dtypes]
  if not set(a.kernels) <= {"value_read", "product_key_topk"}:
    p.error(f"unknown --kernels {a.kernels}; use value_read,product_key_topk")
  if a.iters < 1 or a.warmup < 0 or a.heads < 1 or min(a.m + a.dv) < 1:
    p.error("--iters, --heads, --m and --dv must be positive, --warmup >= 0")
  if any(dv % HC for dv in a.dv):
    p.error(f"every --dv must be divisible by hc={HC}")
  a.backend = None if a.backend == "default" else a.backend
  a.parser = p
  return a


def main(argv: list[str] | None = None) -> None:
  a = parse_args(argv)
  device = jax.devices()[0]
  kind, platform = device.device_kind, device.platform
  if platform == "cpu" and not a.interpret:
    a.parser.exit(2, "pallas_kernels.bench: no accelerator (JAX runs on CPU). "
                  "Pallas kernels run on TPU/GPU or with --interpret; on CPU "
                  "use --interpret with tiny shapes, e.g. --interpret --tokens 64 "
                  "--rows 4096 --m 32 --dv 192 --dtypes float32 --iters 2 "
                  "--warmup 1 --no-write\n")
  mode = "interpret" if a.interpret else "compiled"
  if a.interpret:
    print(f"interpret mode on {platform}: timings are not kernel performance")
    if a.tokens * a.heads * max(a.m) > 1 << 16:
      print("warning: interpret mode with these shapes will take very long; "
            "pass small --tokens/--rows/--m")
  peak, peak_label = peak_bandwidth(kind)
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  print(f"device: {kind} ({platform}); peak memory bandwidth: "
        f"{f'{peak:.3g} B/s ({peak_label})' if peak else 'unknown'}; memory limit: "
        f"{f'{limit / 2**30:.1f} GiB' if limit else 'unknown (nothing skipped)'}")
  tables = run(a, peak, limit)
  text = section(a, kind, mode, peak, peak_label, tables)
  print()
  print(text)
  if not a.no_write:
    update_markdown(a.out, text, kind, mode)
    print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
