"""Whether a training config fits a device, estimated before launch
(``python -m ultramem_jax.inspect CONFIG --memory``), and XLA's own account
of the compiled train step to check the estimate against.

Per device, in bytes:

- parameters: every model variable (parameters, memory buffers and
  statistics) divided by the shards its logical axis names get on the mesh
  (``parallel/rules.py``);
- optimizer state: AdamW's two moments of every parameter, in the
  parameter's dtype and sharded like it;
- gradients: one more copy of the parameters (two with
  ``train.grad_accum_steps`` > 1: the running sum and the microbatch's);
- activations: what the backward pass keeps of one microbatch
  (``data.batch_size / train.grad_accum_steps`` rows, split over the
  batch axes), found exactly by tracing the loss's ``jax.vjp`` on abstract
  shapes under the run's ``model.remat`` policy and summing the residuals
  the backward pass closes over (parameters excluded); plus the backward
  pass's working set: the cotangent of the largest residual (the float32
  logits' gradient), and with remat the activations of the one block the
  backward pass recomputes at a time.

XLA's ``compiled.memory_analysis()`` of the jitted train step
(:func:`compiled_train_memory`) reports argument bytes (the state and the
batch), output bytes (the new state and the metrics), the bytes of outputs
that alias donated arguments (the state is donated, so updated in place)
and temporaries (gradients, activations, workspace). Its peak is
``arguments + outputs - aliased + temporaries``; the estimate's parameters
and optimizer state are the arguments, its gradients and activations the
temporaries (docs/pod.md has the comparison).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ultramem_jax.model.abstract import resolved_vocab
from ultramem_jax.model.transformer import Transformer
from ultramem_jax.parallel.mesh import (batch_sharding, mesh_sizes,
                                       single_device_mesh, use_mesh)
from ultramem_jax.parallel.rules import RULES, batch_shards
from ultramem_jax.training.state import model_and_optimizer
from ultramem_jax.training.step import loss_fn, make_train_step

GIB = 1 << 30

# Memory per chip (GiB) from the vendors' pages: Cloud TPU system
# architecture (v4 32 GiB, v5e 16, v5p 95, v6e 32 HBM per chip) and
# NVIDIA's data sheets (A100 40/80 GB, H100 SXM 80 GB, H200 141 GB; these
# GB are counted as GiB: nvidia-smi shows 81,559 MiB on an H100 80GB).
CHIPS: dict[str, float] = {
    "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
    "a100-40": 40, "a100-80": 80, "h100": 80, "h200": 141,
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of one train step (see the module docstring)."""

  devices: int
  mesh: dict[str, int]
  microbatch: int              # rows per device per microbatch
  remat: str
  parameters: int
  optimizer: int
  gradients: int
  activations: int
  device_memory: int | None = None

  @property
  def terms(self) -> dict[str, int]:
    return {"parameters": self.parameters, "optimizer state": self.optimizer,
            "gradients": self.gradients, "activations": self.activations}

  @property
  def total(self) -> int:
    return sum(self.terms.values())

  @property
  def largest(self) -> str:
    return max(self.terms, key=self.terms.get)

  @property
  def fits(self) -> bool | None:
    return None if self.device_memory is None else self.total <= self.device_memory


def _shards(names, shape, sizes: dict[str, int]) -> int:
  """How many parts a variable with logical axis `names` is split into."""
  n = 1
  for name, dim in zip(names or (), shape):
    axes = RULES.get(name) if name is not None else None
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    k = math.prod(sizes.get(a, 1) for a in axes)
    if dim % k == 0:
      n *= k
  return n


def state_bytes(model: nnx.Module, sizes: dict[str, int]) -> tuple[int, int]:
  """(bytes per device of every variable of `model`, of its parameters)."""
  every, params = 0, 0
  for _, var in nnx.to_flat_state(nnx.state(model)):
    names = var.get_metadata().get("out_sharding")
    b = math.prod(var.shape) * jnp.dtype(var.dtype).itemsize
    b //= _shards(names, var.shape, sizes)
    every += b
    if isinstance(var, nnx.Param):
      params += b
  return every, params


def _nbytes(aval) -> int:
  return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize


def residual_bytes(cfg, rows: int, remat: str | None = None) -> tuple[int, int]:
  """(bytes the backward pass keeps of a batch of `rows` sequences,
  bytes of the largest one) under `remat` (default ``model.remat``),
  traced on abstract shapes."""
  model_cfg = dataclasses.replace(
      cfg.model, vocab_size=resolved_vocab(cfg),
      remat=remat if remat is not None else cfg.model.remat)
  with use_mesh(single_device_mesh()):
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.ShapeDtypeStruct((rows, cfg.data.seq_len), jnp.int32)

  def residuals(params, rest, tokens):
    def objective(p, r):   # r is a primal too: the layers update it
      m = nnx.merge(graphdef, p, r)
      return loss_fn(m, {"inputs": tokens, "targets": tokens})[0]
    return jax.tree.leaves(jax.vjp(objective, params, rest)[1])

  closed = jax.make_jaxpr(residuals)(params, rest, tokens)
  inputs = set(map(id, closed.jaxpr.invars))
  seen, sizes = set(), []
  for v in closed.jaxpr.outvars:
    if isinstance(v, jax.extend.core.Literal) or id(v) in inputs or id(v) in seen:
      continue
    seen.add(id(v))
    sizes.append(_nbytes(v.aval))
  return sum(sizes), max(sizes, default=0)


def activation_bytes(cfg, rows: int) -> int:
  """Residuals of one microbatch of `rows` per device under model.remat, the
  cotangent of the largest, and with remat one block's recomputation."""
  kept, largest = residual_bytes(cfg, rows)
  if cfg.model.remat == "none":
    return kept + largest
  everything, _ = residual_bytes(cfg, rows, "none")
  one_block = max(0, everything - kept) // cfg.model.n_layers
  return kept + largest + one_block


def estimate_train_memory(cfg, model: nnx.Module, devices: int | None = None,
                          device_memory: float | None = None) -> MemoryEstimate:
  """The estimate for the root config `cfg` on the mesh over `devices`
  (``parallel/mesh.mesh_sizes``); `model` is its abstract Transformer
  (``model/abstract.py``); `device_memory` in bytes, if known."""
  sizes = mesh_sizes(cfg.mesh, devices)
  n = math.prod(sizes.values())
  every, params = state_bytes(model, sizes)
  micro = cfg.data.batch_size // cfg.train.grad_accum_steps
  rows = max(1, micro // batch_shards(sizes))
  return MemoryEstimate(
      devices=n, mesh=sizes, microbatch=rows, remat=cfg.model.remat,
      parameters=every, optimizer=2 * params,
      gradients=params * (2 if cfg.train.grad_accum_steps > 1 else 1),
      activations=activation_bytes(cfg, rows),
      device_memory=int(device_memory) if device_memory else None)


def _placed(x, mesh: Mesh):
  return jax.ShapeDtypeStruct(x.shape, x.dtype,
                              sharding=NamedSharding(mesh, x.sharding.spec))


def compile_train_step(cfg, mesh: Mesh):
  """The real train step of `cfg` (its vocabulary resolved) compiled for
  `mesh` from shapes with their shardings (nothing is allocated); what a
  benchmark times for compile time, and what :func:`compiled_train_memory`
  reads."""
  with use_mesh(mesh):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_and_optimizer(cfg)))
    state = jax.tree.map(lambda x: _placed(x, mesh), state)
    rows = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len),
                                jnp.int32, sharding=batch_sharding(mesh))
    batch = {"inputs": rows, "targets": rows}
    return make_train_step(graphdef).lower(state, batch).compile()


def compiled_train_memory(cfg, mesh: Mesh) -> dict[str, int]:
  """XLA's ``memory_analysis()`` of :func:`compile_train_step`, per device:
  arguments, outputs, aliased, temporaries and their peak."""
  m = compile_train_step(cfg, mesh).memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes),
         "outputs": int(m.output_size_in_bytes),
         "aliased": int(m.alias_size_in_bytes),
         "temporaries": int(m.temp_size_in_bytes)}
  out["peak"] = (out["arguments"] + out["outputs"] - out["aliased"]
                 + out["temporaries"])
  return out


def _gib(n: float) -> str:
  return f"{n / GIB:,.2f} GiB"


def memory_table(e: MemoryEstimate) -> str:
  """The estimate as text, with the verdict against the device memory."""
  mesh = " ".join(f"{a}={s}" for a, s in e.mesh.items())
  lines = [f"per device ({e.devices} devices, mesh {mesh}; model.remat={e.remat}, "
           f"{e.microbatch} row(s) per device per microbatch):"]
  for name, b in e.terms.items():
    lines.append(f"  {name:<16} {_gib(b):>14}")
  lines.append(f"  {'total':<16} {_gib(e.total):>14}")
  if e.device_memory is None:
    lines.append(f"device memory unknown (give --device_memory GiB or --chip "
                 f"{'|'.join(CHIPS)}); largest term: {e.largest}")
  elif e.fits:
    lines.append(f"fits: {_gib(e.total)} of {_gib(e.device_memory)} "
                 f"({100 * e.total / e.device_memory:.0f}%); largest term: "
                 f"{e.largest}")
  else:
    lines.append(f"does not fit: {_gib(e.total)} needed, {_gib(e.device_memory)} "
                 f"per device; largest term: {e.largest} "
                 f"({_gib(e.terms[e.largest])})")
  return "\n".join(lines)
