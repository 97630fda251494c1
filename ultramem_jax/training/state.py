"""The train state: model and optimizer, split into a graph and its arrays."""

from __future__ import annotations

import jax
from flax import nnx

from ultramem_jax.model.transformer import build_model
from ultramem_jax.training.config import Config
from ultramem_jax.training.optimizer import make_optimizer


def create_state(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds model and optimizer under the current mesh and logical rules
  (``parallel.mesh.use_mesh``) and splits them: ``state`` is what the steps
  take and what checkpoints hold."""
  return nnx.split(model_and_optimizer(cfg))


def model_and_optimizer(cfg: Config) -> tuple[nnx.Module, nnx.Optimizer]:
  """The model and its optimizer, unsplit (``nnx.eval_shape`` of this is
  the train state's shapes and shardings, nothing allocated)."""
  model = build_model(cfg.model, cfg.train.seed)
  return model, make_optimizer(model, cfg.optimizer, cfg.train.steps)


def param_count(state: nnx.State) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(state[0], nnx.Param)))
