"""The memory estimate of a train step (training/memory_estimate.py)
against XLA's memory_analysis() of the real jitted step, and what
``inspect --memory`` prints."""

from __future__ import annotations

import pathlib

import jax
import pytest

from ultramem_jax import inspect as inspect_cli
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.parallel.mesh import make_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.memory_estimate import (CHIPS, GIB,
                                                   compiled_train_memory,
                                                   estimate_train_memory)

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny configs at a smaller batch and depth, so each compiles quickly.
SMALL = ["model.vocab_size=257", "data.batch_size=8", "data.seq_len=64",
         "model.n_layers=2"]
# On the CPU, XLA schedules an unrolled model's recomputation early (its
# memory_analysis barely moves with remat); inside a scan each layer's
# recomputation waits for its turn, so remat is checked on scanned layers.
CASES = [
    ("tiny_moe", [], 1),
    ("tiny_ultramem_v2", [], 1),
    ("tiny_dense", ["model.remat=full", "model.scan_layers=true"], 1),
    ("tiny_ultramem_v2", ["model.remat=save_dots_and_retrieval",
                          "model.scan_layers=true"], 1),
    ("tiny_dense", ["mesh.data=2", "mesh.fsdp=4"], 8),
]


@pytest.mark.parametrize("name, extra, devices", CASES)
def test_estimate_within_a_quarter_of_xla(name, extra, devices):
  cfg = load_config(REPO / f"configs/{name}.yaml", SMALL + extra)
  est = estimate_train_memory(cfg, abstract_model(cfg), devices)
  xla = compiled_train_memory(cfg, make_mesh(cfg.mesh, jax.devices()[:devices]))
  assert abs(est.total / xla["peak"] - 1) <= 0.25, (est, xla)
  # The arguments are the state: parameters and buffers, Adam's moments.
  assert abs((est.parameters + est.optimizer) / xla["arguments"] - 1) <= 0.02


def test_remat_lowers_the_activations_in_order():
  acts = {}
  for policy in ("none", "save_dots", "save_dots_and_retrieval", "full"):
    cfg = load_config(REPO / "configs/tiny_ultramem_v2.yaml",
                      SMALL + [f"model.remat={policy}"])
    acts[policy] = estimate_train_memory(cfg, abstract_model(cfg), 1).activations
  assert acts["none"] > acts["save_dots_and_retrieval"] >= acts["save_dots"] > acts["full"]


def test_inspect_memory_says_what_does_not_fit(capsys):
  config = str(REPO / "configs/tiny_dense.yaml")
  assert inspect_cli.main([config, *SMALL, "--memory", "--devices", "1",
                           "--device_memory", "0.01"]) == 0
  out = capsys.readouterr().out
  assert "does not fit" in out and "largest term: activations" in out
  for term in ("parameters", "optimizer state", "gradients", "activations", "total"):
    assert term in out
  assert inspect_cli.main([config, *SMALL, "--memory", "--chip", "v5p"]) == 0
  assert f"of {CHIPS['v5p']:.2f} GiB" in capsys.readouterr().out
  assert inspect_cli.main([config, "--memory", "--chip", "v9"]) == 2
  assert "--chip: got 'v9'; known chips: v4" in capsys.readouterr().err
  assert GIB == 2 ** 30
