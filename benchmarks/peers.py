"""peers: lucidrains' ``ultra-mem`` (PyTorch) against this project's UltraMem
v1 and UltraMemV2 layers at the closest config, forward+backward on the CPU
with the same number of threads. torch and ultra-mem are optional
(``benchmarks/requirements-peers.txt``); without them the benchmark times
our two layers and says how to install the peer."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.machine import cores
from benchmarks.report import Result, Table
from benchmarks.timing import interleave, ms, pct
from ultramem_jax.model.memory.layer import MemoryLayer
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config

INSTALL = "pip install -r benchmarks/requirements-peers.txt"
PEER = "lucidrains ultra-mem (PyTorch)"
# (d, memories = slots addressed, top-m, value expansion E, tokens, Dk)
FULL = dict(dim=256, memories=65_536, topk=32, expansion=4, tokens=2048,
            key_dim=128)
QUICK = dict(dim=32, memories=256, topk=4, expansion=4, tokens=16, key_dim=16)

DESCRIPTION = f"""\
Forward+backward (gradients of `sum(out * ct)` with respect to every
parameter and the input) of one memory layer on {FULL['tokens']:,} tokens
of width {FULL['dim']}: lucidrains' `ultra-mem` (`UltraMem(dim=256,
num_memories=65536, topk=32, value_expansion=4)`, its defaults otherwise:
2 cores of rank 2, Dk 128, in training mode) against this project's UltraMem
v1 and UltraMemV2 layers (`ultramem_jax/model/memory/layer.py`) configured
to match: 65,536 slots addressed, top-32, one query of Dk 128, Tucker rank 2
with 2 cores. All three are timed in turn in one process with the same
number of threads (`torch.set_num_threads` = the cores XLA uses); median
and spread = (max - min) / median. torch and ultra-mem are not in
`requirements.txt`: `{INSTALL}` installs them, and without them this
section has our two layers only.

Settings that differ (ultra-mem's code read to map its config to ours):

- value expansion: ultra-mem stores 16,384 rows of 128 per core and expands
  them with 4 projection matrices of 128 x 128 per core (a scatter into 4
  slots, then a sum of the projections); v1 stores 16,384 rows of 256 (the
  2 cores are the two column halves of a row), sqrt(E) * 128 = 256 keys per
  side address 4 virtual blocks, and Wo reads all 4 blocks (4 * 256 -> 256).
  UltraMemV2 has no expansion: 65,536 rows of Dv = Dp = 64 (d / 4, the
  paper's ratio) with pre-values, and Wo 64 -> 256;
- scoring: ultra-mem picks the top-32 separately for each of its 2 cores
  (64 rows read per token); ours pick one top-32 by the summed score and
  weight each core's column half by its own score (32 rows per token);
- ultra-mem also runs a causal depthwise convolution (kernel 5) before the
  queries, LayerNorms on queries and keys, an RMSNorm of the input, a ReLU
  on the scores, its core's SVD and auxiliary loss every call; ours use
  RMS query/key norms and Tucker vectors refreshed once per optimizer
  step (outside this timing).
"""


def _import_peer():
  """(torch, ultra_mem.UltraMem); ImportError when either is missing."""
  torch = importlib.import_module("torch")
  return torch, importlib.import_module("ultra_mem").UltraMem


def _our_configs(s: dict) -> dict:
  """UltraMem v1 and UltraMemV2 ModelConfigs matching the sizes `s`."""
  n_side = int(round(s["memories"] ** 0.5))
  common = ["model.n_layers=1", f"model.d_model={s['dim']}", "model.n_heads=2",
            "model.vocab_size=256", "model.memory.layers='0'",
            "model.memory.heads=1", "model.memory.share_query=false",
            f"model.memory.key_dim={s['key_dim']}",
            f"model.memory.top_m={s['topk']}",
            f"model.memory.prefilter_k={s['topk']}",
            "model.memory.tucker_rank=2", "model.memory.tucker_cores=2",
            "model.memory.init=released"]
  e = s["expansion"]
  v1 = load_config("configs/tiny_ultramem.yaml", common + [
      f"model.memory.n_keys={n_side // int(round(e ** 0.5))}",
      f"model.memory.value_expansion={e}", f"model.memory.value_dim={s['dim']}"])
  v2 = load_config("configs/tiny_ultramem_v2.yaml", common + [
      f"model.memory.n_keys={n_side}", f"model.memory.value_dim={s['dim'] // 4}",
      f"model.memory.pre_value_dim={s['dim'] // 4}"])
  return {"UltraMem v1 (ours, JAX)": v1.model, "UltraMemV2 (ours, JAX)": v2.model}


def _ours(cfg, x, ct):
  """A closure running our layer's forward+backward, and its parameters."""
  layer = MemoryLayer(cfg, 0, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(layer, x):
    return jnp.sum(layer(x).astype(jnp.float32) * ct)

  diff = nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1))
  step = jax.jit(lambda s, x: diff(nnx.merge(graphdef, s), x))
  params = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  return (lambda: step(state, x)), params


def _theirs(torch, UltraMem, s: dict, x: np.ndarray, ct: np.ndarray):
  """A closure running ultra-mem's forward+backward, and its parameters."""
  torch.manual_seed(0)
  mem = UltraMem(dim=s["dim"], num_memories=s["memories"], topk=s["topk"],
                 dim_queries_keys=s["key_dim"], value_expansion=s["expansion"])
  mem.train()
  tx = torch.from_numpy(x[None]).requires_grad_(True)
  tct = torch.from_numpy(ct[None])

  def step():
    mem.zero_grad(set_to_none=True)
    tx.grad = None
    out, _, aux = mem(tx)
    ((out * tct).sum() + aux).backward()
    return None

  return step, sum(p.numel() for p in mem.parameters())


def run(quick: bool = False) -> Result:
  s = QUICK if quick else FULL
  rng = np.random.default_rng(0)
  x = rng.standard_normal((s["tokens"], s["dim"])).astype(np.float32)
  ct = rng.standard_normal((s["tokens"], s["dim"])).astype(np.float32)
  fns, params, notes = {}, {}, []
  threads = cores()
  try:
    torch, UltraMem = _import_peer()
  except ImportError as e:
    missing = f"{PEER} not run: {e} (install it with `{INSTALL}`)"
    notes.append(f"**{missing}.**")
    print(missing)
    torch = None
  if torch is not None:
    torch.set_num_threads(threads)
    fns[PEER], params[PEER] = _theirs(torch, UltraMem, s, x, ct)
  with use_mesh(single_device_mesh()):
    for name, cfg in _our_configs(s).items():
      fns[name], params[name] = _ours(cfg, jnp.asarray(x), jnp.asarray(ct))
    t = interleave(fns, rounds=1 if quick else 10, min_rounds=1 if quick else 4,
                   budget_s=None if quick else 30.0, desc="peers",
                   progress=not quick)
  ref = t[PEER].median if PEER in t else None
  rows = [[name, f"{params[name]:,}", ms(t[name].median),
           pct(t[name].spread), f"{t[name].first_s:.1f}",
           f"{ref / t[name].median:.2f}x" if ref else "n/a"] for name in fns]
  table = Table("Forward+backward of one layer",
                ["layer", "params", "ms", "spread", "first s",
                 "speed-up over ultra-mem"],
                rows, ["", "absolute", "", "absolute", "ratio"],
                ["first s: the first call (JAX: compiles it)."])
  versions = f"JAX {jax.__version__}" + (
      f", torch {torch.__version__}, {torch.get_num_threads()} torch threads"
      if torch is not None else "")
  setup = [f"d {s['dim']}, {s['memories']:,} slots, top-{s['topk']}, value "
           f"expansion {s['expansion']}, {s['tokens']:,} tokens, Dk "
           f"{s['key_dim']}" + (" (`--quick` sizes)" if quick else ""),
           f"{versions}; {threads} cores"]
  return Result("peers", DESCRIPTION, setup, [table], notes,
                data={"timing": t, "params": params, "peer_missing": torch is None})
