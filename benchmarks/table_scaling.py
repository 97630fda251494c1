"""table_scaling: what a bigger value table costs UltraMemV2 at fixed m.

tiny_ultramem_v2 with 1x, 4x and 16x the value rows (2x and 4x the keys per
side), split into the memory layer's retrieval, its value read, the table's
gradient and the optimizer's update, next to the whole train step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from benchmarks.report import Result, Table
from benchmarks.timing import interleave, ms
from benchmarks.train import QUICK as TRAIN_QUICK, random_batch
from ultramem_jax.model.memory.layer import memory_layers
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import make_train_step

CONFIG = "configs/tiny_ultramem_v2.yaml"
SCALES = (1, 4, 16)
QUICK_SCALES = (1, 4)
QUICK = TRAIN_QUICK

DESCRIPTION = """\
`configs/tiny_ultramem_v2.yaml` (4 blocks, d 128, m 16, Dv = Dp = 64) with
its value table at 1x, 4x and 16x the rows (`model.memory.n_keys` 90, 180,
360: 8,100 to 129,600 rows per layer), m fixed. The first block's memory
layer alone, on random inputs of the config's batch (32 x 128 = 4,096
tokens):

- retrieval: `layer.retrieve` (steps 1-4: queries, key scores, the
  pre-filter and the Tucker top-m), forward;
- value read: the whole layer's forward minus retrieval (steps 5-7:
  addresses, weights, the weighted read of values and pre-values, Wo);
- table gradient: the layer's forward+backward with respect to every
  parameter and the input, minus the same without the table (values,
  pre-values);
- optimizer update: the project's optimizer (`training/optimizer.py`:
  clip, AdamW per parameter group, non-finite guard) on the whole model's
  parameters, dense as it is;

and the whole train step (`training/step.py`). All programs at all three
scales are timed in one interleaved loop (each program at 1x, 4x, 16x, the
next program, ..., then again): medians, ms; differences of medians are
estimates. Ratios are to the 1x table.
"""


def _config(scale: int, quick: bool):
  base = load_config(CONFIG, QUICK if quick else [])
  n = base.model.memory.n_keys * int(round(scale ** 0.5))
  extra = [] if quick else ["model.vocab_size=4096"]
  return load_config(CONFIG, (QUICK if quick else []) + extra
                     + [f"model.memory.n_keys={n}"])


def _programs(cfg, seed: int = 0) -> dict:
  """The closures timed at one scale, keyed by program."""
  graphdef, state = create_state(cfg)
  model, optimizer = nnx.merge(graphdef, state)
  _, layer = memory_layers(model)[0]
  lg, lstate = nnx.split(layer)
  n = cfg.data.batch_size * cfg.data.seq_len
  key = jax.random.key(seed)
  x = jax.random.normal(key, (n, cfg.model.d_model), jnp.float32)
  ct = jax.random.normal(jax.random.fold_in(key, 1), x.shape, jnp.float32)
  not_table = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("table")))

  def loss(layer, x):
    return jnp.sum(layer(x).astype(jnp.float32) * ct)

  def grad(wrt):
    diff = nnx.grad(loss, argnums=(nnx.DiffState(0, wrt), 1))
    return jax.jit(lambda s, x: diff(nnx.merge(lg, s), x))

  retrieve = jax.jit(lambda s, x: nnx.merge(lg, s).retrieve(x)[0])
  forward = jax.jit(lambda s, x: nnx.merge(lg, s)(x))
  grad_all, grad_no_table = grad(nnx.Param), grad(not_table)
  og, ostate = nnx.split((model, optimizer))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)

  @functools.partial(jax.jit, donate_argnums=0)
  def update(ostate, grads):    # donated, in place as in the train step
    m, opt = nnx.merge(og, ostate)
    opt.update(m, grads)
    return nnx.state((m, opt))

  opt_holder = {"state": jax.tree.map(jnp.copy, ostate)}

  def optimizer_update():
    opt_holder["state"] = update(opt_holder["state"], grads)
    return opt_holder["state"]

  train_step = make_train_step(graphdef)
  fresh = jax.tree.map(jnp.copy, state)   # the step donates its state
  batch = random_batch(cfg, cfg.train.seed)
  holder = {"state": fresh}

  def train():
    holder["state"], metrics = train_step(holder["state"], batch)
    return metrics

  return {"retrieval": lambda: retrieve(lstate, x),
          "layer forward": lambda: forward(lstate, x),
          "fwd+bwd without table": lambda: grad_no_table(lstate, x),
          "fwd+bwd": lambda: grad_all(lstate, x),
          "optimizer update": optimizer_update,
          "train step": train}


def _measure(scales, quick: bool) -> tuple[dict, dict]:
  """(config per scale, {program: {scale: median seconds}})."""
  cfgs = {s: _config(s, quick) for s in scales}
  times: dict = {}
  with use_mesh(single_device_mesh()):
    progs = {s: _programs(cfgs[s]) for s in tqdm(scales, desc="tables: build",
                                                 leave=False)}
    # Every program at every scale in one interleaved loop, so that the
    # differences of medians below come from the same stretch of time.
    fns = {(name, s): fn for s in scales for name, fn in progs[s].items()}
    t = interleave(fns, rounds=1 if quick else 10, min_rounds=1 if quick else 4,
                   budget_s=None if quick else 60.0, desc="table_scaling",
                   progress=not quick)
  for (name, s), timing in t.items():
    times.setdefault(name, {})[s] = timing.median
  return cfgs, times


def _derived(times: dict, scales) -> dict:
  """The split of the measured programs: value read and table gradient are
  differences of medians."""
  return {
      "retrieval": times["retrieval"],
      "value read": {s: times["layer forward"][s] - times["retrieval"][s]
                     for s in scales},
      "table gradient": {s: times["fwd+bwd"][s] - times["fwd+bwd without table"][s]
                         for s in scales},
      "optimizer update": times["optimizer update"],
      "train step": times["train step"]}


def _program_table(times: dict, derived: dict, scales) -> Table:
  rows = []
  for name, by in [*times.items(), *[(k, v) for k, v in derived.items()
                                     if k in ("value read", "table gradient")]]:
    rows.append([name] + [ms(by[s]) for s in scales]
                + [f"{by[s] / by[scales[0]]:.2f}x" if by[scales[0]] > 0 else "n/a"
                   for s in scales[1:]])
  header = (["program"] + [f"{s}x table ms" for s in scales]
            + [f"{s}x / 1x" for s in scales[1:]])
  measured = Table("Per program", header, rows,
                   ["absolute"] * len(scales) + ["ratio"] * (len(scales) - 1),
                   ["The last two rows are differences of the medians above "
                    "(value read = layer forward - retrieval; table gradient = "
                    "fwd+bwd - fwd+bwd without table). A negative one means "
                    "the parts do not add up: XLA compiles a part alone "
                    "differently from the whole (retrieval alone ran slower "
                    "than the whole layer on the 2-core CPU), so there read the "
                    "measured rows."])
  return measured


def _step_table(cfgs: dict, times: dict, derived: dict, scales) -> Table:
  step = times["train step"]
  share = []
  for s in scales:
    extra = step[s] - step[scales[0]]
    share.append([f"{s}x", f"{cfgs[s].model.memory.n_keys}",
                  f"{cfgs[s].model.memory.n_keys ** 2:,}", ms(step[s]),
                  f"{step[s] / step[scales[0]]:.2f}x",
                  ms(extra) if s != scales[0] else "",
                  ms(derived["optimizer update"][s]
                     - derived["optimizer update"][scales[0]])
                  if s != scales[0] else "",
                  ms(cfgs[s].model.n_layers * (derived["table gradient"][s]
                                               - derived["table gradient"][scales[0]]))
                  if s != scales[0] else ""])
  per_step = Table(
      "The train step", ["table", "keys per side", "rows per layer", "step ms",
                         "step / 1x", "extra ms over 1x",
                         "of which optimizer update", "of which table gradient (x layers)"],
      share, ["", "", "absolute", "ratio", "absolute", "absolute", "absolute"],
      ["\"of which\": the growth over 1x of the optimizer update and of one "
       "layer's table gradient times the memory layers; what is left is the "
       "rest of the step (retrieval over more keys, the table's Tucker "
       "refresh and usage stamps)."])
  return per_step


def run(quick: bool = False) -> Result:
  scales = QUICK_SCALES if quick else SCALES
  cfgs, times = _measure(scales, quick)
  derived = _derived(times, scales)
  measured = _program_table(times, derived, scales)
  per_step = _step_table(cfgs, times, derived, scales)
  setup = [f"config `{CONFIG}`" + (f" with `--quick` overrides {' '.join(QUICK)}"
                                   if quick else ""),
           f"scales {', '.join(f'{s}x' for s in scales)} (keys per side "
           f"{', '.join(str(cfgs[s].model.memory.n_keys) for s in scales)})"]
  return Result("table_scaling", DESCRIPTION, setup, [measured, per_step],
                data={"times": times, "derived": derived})
