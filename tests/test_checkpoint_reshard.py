"""Checkpoint re-sharding on 8 emulated CPU devices: a train state saved
under one mesh restores onto another (2x4 -> 4x2, 1 device, 8x1), bit for
bit and placed as the rules table says for the new mesh; and a run resumed
through ``train()`` on another mesh continues the same loss curve.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from ultramem_jax.data.pipeline import train_dataset
from ultramem_jax.parallel.mesh import MeshConfig, make_mesh, single_device_mesh, use_mesh
from ultramem_jax.parallel.rules import logical_to_mesh
from ultramem_jax.training.checkpoint import Checkpointer
from ultramem_jax.training.config import load_config
from ultramem_jax.training.run_dir import latest_checkpoint_step
from ultramem_jax.training.state import create_state
from ultramem_jax.training.trainer import train

TRUNK = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.vocab_size=257", "data.tokenizer=bytes", "data.seq_len=16",
         "data.batch_size=8"]
# As tests/test_sharding.py: 36-row value tables column-sharded over `memory`.
V2 = ["model.ffn.inner_dim=64", "model.memory.layers=all", "model.memory.n_keys=6",
      "model.memory.key_dim=8", "model.memory.top_m=4", "model.memory.value_dim=16",
      "model.memory.pre_value_dim=16", "model.memory.init_samples=32"]
MOE = ["model.ffn.moe.num_experts=8", "model.ffn.moe.top_k=2",
       "model.ffn.moe.expert_dim=16"]
# (config file, overrides, the axis that holds the sharded weights)
MODELS = {"ultramem_v2": ("configs/tiny_dense.yaml", V2, "memory"),
          "moe": ("configs/tiny_moe.yaml", MOE, "expert")}


def model_config(kind: str, tmp_path, *extra):
  path, overrides, _ = MODELS[kind]
  return load_config(path, [*TRUNK, *overrides,
                            f"train.run_dir={tmp_path / 'run'}", *extra])


def target_mesh(axis: str, layout: tuple[int, int] | None):
  """(data, `axis`) mesh of that shape, or one device for None."""
  if layout is None:
    return single_device_mesh()
  return make_mesh(MeshConfig(**{"data": layout[0], axis: layout[1]}))


def abstract_state(cfg, mesh):
  """The train state's Variables, values as ShapeDtypeStructs placed on
  `mesh` as the model creates them there, without building it."""
  with use_mesh(mesh):
    _, abstract = nnx.eval_shape(lambda: create_state(cfg))
  # eval_shape names the abstract mesh; restoring needs the devices.
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=NamedSharding(mesh, x.sharding.spec)),
      abstract)


def expected_spec(var: nnx.Variable) -> tuple:
  """The rules table's mesh axes of each dimension (None: not sharded)."""
  names = var.get_metadata().get("out_sharding") or ()
  spec = tuple(logical_to_mesh(names)) if names else ()
  return spec + (None,) * (len(var.shape) - len(spec))


def local_shape(shape: tuple, spec: tuple, mesh) -> tuple:
  def shards(axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))
  return tuple(size // shards(axes) for size, axes in zip(shape, spec))


def random_state(abstract, seed: int = 0):
  """Arrays of `abstract`'s shapes, dtypes and shardings holding random
  values (so a shard restored to the wrong place shows), written straight
  to their devices: nothing to compile, and no array can pass for the
  init."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if np.issubdtype(x.dtype, np.floating):
      host = rng.standard_normal(x.shape).astype(x.dtype)
    elif x.dtype == np.bool_:
      host = rng.random(x.shape) < 0.5
    else:
      host = rng.integers(1, 1000, x.shape).astype(x.dtype)
    return jax.make_array_from_callback(x.shape, x.sharding, lambda i: host[i])

  return jax.tree.map(fill, abstract)


def assert_bits_equal(a, b, where):
  a, b = np.asarray(a), np.asarray(b)
  assert (a.dtype, a.shape) == (b.dtype, b.shape), where
  assert a.tobytes() == b.tobytes(), f"{where} differs from what was saved"


ROWS = np.arange(40 * 17, dtype=np.int32).reshape(40, 17) % 257


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_restore_onto_other_meshes(tmp_path, kind):
  axis = MODELS[kind][2]
  cfg = model_config(kind, tmp_path)
  # The train state as create_state places it on data=2 x `axis`=4 (the
  # abstract one: building and initialising it would only cost time).
  state = random_state(abstract_state(cfg, target_mesh(axis, (2, 4))))
  saved = {path: var[...] for path, var in nnx.to_flat_state(state)}
  sharded = [p for p, x in saved.items() if axis in x.sharding.spec]
  assert len(sharded) >= 4, f"nothing of the model is sharded over {axis}"

  it = iter(train_dataset(ROWS, 8, seed=0))
  next(it)
  ckpt = Checkpointer(tmp_path / "ck", max_to_keep=1)
  ckpt.save(5, state, it, {"step": 5})
  ckpt.wait()
  expected_next = next(it)["inputs"]

  for layout in [(4, 2), None, (8, 1)]:
    mesh = target_mesh(axis, layout)
    abstract = abstract_state(cfg, mesh)
    fresh_it = iter(train_dataset(ROWS, 8, seed=0))
    restored, meta = ckpt.restore(5, abstract, fresh_it)
    assert meta == {"step": 5}
    np.testing.assert_array_equal(next(fresh_it)["inputs"], expected_next)
    got = dict(nnx.to_flat_state(restored))
    assert got.keys() == saved.keys()
    for path, var in nnx.to_flat_state(abstract):
      where = f"{layout}: {'/'.join(map(str, path))}"
      x = got[path][...]
      assert_bits_equal(x, saved[path], where)
      spec = expected_spec(var)
      assert x.sharding.mesh == mesh, where
      assert tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)) \
          == spec, where
      shards = x.addressable_shards
      assert len(shards) == mesh.size, where
      assert all(s.data.shape == local_shape(x.shape, spec, mesh)
                 for s in shards), where
    # The weights that were split 4 ways are split as the new mesh says.
    for path in sharded:
      x = got[path][...]
      assert axis in x.sharding.spec
      dim = x.sharding.spec.index(axis)
      ways = 1 if layout is None else layout[1]
      assert x.addressable_shards[0].data.shape[dim] == x.shape[dim] // ways
  ckpt.close()


def test_resume_on_another_mesh_continues_the_run(tmp_path, text_dir):
  """A 4-step run on data=2 x memory=4 that checkpoints at step 2; the same
  run resumed from that checkpoint on data=4 x memory=2 reaches steps 3
  and 4 with the same losses and validation loss.

  Tolerance 1e-5 relative. The two meshes add the same float32 terms in
  another order (the pre-value dot is summed over 4 vs 2 column shards,
  gradients are reduced over other device groups), so each resumed update
  differs by rounding; measured, the step-3/4 and validation losses differ
  by 0 to 1 ulp (<= 1e-7 relative). 1e-5 leaves 100x room for that to grow
  through Adam and is still some 10^4 times smaller than the loss change
  of one step (> 1e-2, asserted), the scale of what a resume that read
  another batch or lost its optimizer state would be off by.

  One layer, and the released init (no calibration pass): each train()
  builds and initialises the model eagerly on its mesh, and the resumed
  run throws that init away."""

  def run_cfg(root, data, memory):
    return model_config(
        "ultramem_v2", root, "model.n_layers=1", "model.memory.init=released",
        f"data.source={text_dir}", "data.val_fraction=0.1",
        "optimizer.warmup_steps=0", "train.steps=4", "train.checkpoint_every=2",
        "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
        "train.progress_bar=false", f"mesh.data={data}", f"mesh.memory={memory}")

  full = train(run_cfg(tmp_path / "a", 2, 4), log=lambda s: None)
  assert sorted(full.losses) == [1, 2, 3, 4]
  assert abs(full.losses[4] - full.losses[3]) > 1e-2
  # The same run as it stood after step 2: its step-2 checkpoint only.
  shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
  shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "4")
  assert latest_checkpoint_step(tmp_path / "b" / "run") == 2

  logs = []
  resumed = train(run_cfg(tmp_path / "b", 4, 2), log=logs.append)
  assert any(line.startswith("mesh: {'data': 4,") and "'memory': 2}" in line
             for line in logs), logs
  assert any(line.startswith("resumed from") and line.endswith("checkpoints/2")
             for line in logs), logs
  assert sorted(resumed.losses) == [3, 4]
  for step in (3, 4):
    assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5)
  assert resumed.val_loss == pytest.approx(full.val_loss, rel=1e-5)
