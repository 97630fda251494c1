"""Value tables in host memory (``model.memory.table_memory: host``): where
the tables are placed, what the decode step moves between host and device,
the cached logits against ``device`` (bitwise: on the CPU host and device
memory are one, and the host read does the device path's arithmetic), on
one device and on a data=2 x memory=4 mesh, the command line, and the
refusals."""

from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from memory_variants import VARIANTS
from test_generate import SEQ, SMALL, V2, train_small_run
from ultramem_jax.config import ConfigError
from ultramem_jax.evaluation.generate import Sampler, extend_and_sample
from ultramem_jax.evaluation.harness_model import UltraMemLM
from ultramem_jax.evaluation.restore import restore_run
from ultramem_jax.model.kv_cache import KVCache
from ultramem_jax.model.memory.host_read import HostRead
from ultramem_jax.model.transformer import build_model
from ultramem_jax.parallel import host_tables
from ultramem_jax.parallel.mesh import MeshConfig, make_mesh, single_device_mesh, use_mesh
from ultramem_jax.training import memory_budget
from ultramem_jax.training.config import load_config
from ultramem_jax.training.trainer import train

V2_CFG = ("configs/tiny_ultramem_v2.yaml", V2 + ["model.memory.init=released"])
V1 = VARIANTS["ultramem_v1"] | {"value_dim": 8, "layers": "'0:1'"}   # a skip pair
MEMORY_PLUS = VARIANTS["memory_plus"] | {"layers": "0,1"}
MODELS = {
    "ultramem_v2": V2_CFG,
    "ultramem_v1": ("configs/tiny_ultramem.yaml",
                    ["model.ffn.inner_dim=64", "model.memory.init_samples=32"]
                    + [f"model.memory.{k}={v}" for k, v in V1.items()]),
    "memory_plus": ("configs/tiny_memory_plus.yaml",
                    ["model.memory.init_samples=32"]
                    + [f"model.memory.{k}={v}" for k, v in MEMORY_PLUS.items()]),
}
STEPS = 4     # decode steps


def model_cfg(name: str, *extra: str):
  path, overrides = MODELS[name]
  return load_config(path, [*SMALL, *overrides, *extra]).model


def cached_logits(cfg, graphdef, params, copies: int = 1) -> np.ndarray:
  """STEPS decode steps from an empty cache, teacher-forced on SEQ's two
  rows (repeated `copies` times, to fill a mesh's batch shards): the logits
  of every step, [STEPS, 2 * copies, V]. (Decode steps only, so each model
  compiles one program; the prompt's prefill reads the tables the same
  way, and the command-line test below runs it.)"""
  seq = np.tile(SEQ, (copies, 1))
  sampler = Sampler(graphdef, params, cfg)
  cache = KVCache.create(cfg, len(seq), STEPS, jnp.zeros(len(seq), jnp.int32))
  out = []
  for j in range(STEPS):
    _, logits, cache = sampler.decode(cache, seq[:, j])
    out.append(np.asarray(logits))
  return np.stack(out)


def device_and_host(name: str, mesh, *extra: str, modes=("rows", "sum")):
  """(device logits, {host_read mode: host logits}, host params) of the
  same weights."""
  with use_mesh(mesh):
    dev = model_cfg(name, *extra)
    graphdef, params = nnx.split(build_model(dev, seed=0))
    copies = mesh.size // 2 if mesh.size > 1 else 1
    want = cached_logits(dev, graphdef, params, copies)
    host_params = host_tables.tables_to_host(params)
    got = {}
    for mode in modes:
      host = model_cfg(name, *extra, "model.memory.table_memory=host",
                       f"model.memory.host_read={mode}")
      host_graph, _ = nnx.split(build_model(host, seed=0))
      got[mode] = cached_logits(host, host_graph, host_params, copies)
  return want, got, host_params


def table_kinds(params) -> dict[str, str]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): x.sharding.memory_kind for p, x in flat
          if host_tables.is_table_path(p)}


@pytest.mark.parametrize("name", list(MODELS))
def test_host_logits_equal_device_on_one_device(name):
  """Both host reads (rows: the kept rows to the device; sum: the read)."""
  want, got, params = device_and_host(name, single_device_mesh())
  kinds = table_kinds(params)
  assert kinds and set(kinds.values()) == {"pinned_host"}
  for mode, logits in got.items():
    np.testing.assert_array_equal(logits, want, err_msg=mode)


@pytest.mark.parametrize("name,extra,mode", [
    ("ultramem_v2", (), "sum"),
    ("ultramem_v2", ("model.memory.table_sharding=row",), "rows"),
    ("ultramem_v1", (), "rows"), ("memory_plus", (), "sum")])
def test_host_logits_equal_device_on_a_mesh(name, extra, mode):
  """data=2 x memory=4: each device's host shard is its device shard."""
  mesh = make_mesh(MeshConfig(data=2, memory=4))
  want, got, params = device_and_host(name, mesh, *extra, modes=(mode,))
  np.testing.assert_array_equal(got[mode], want)
  row = "model.memory.table_sharding=row" in extra
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if host_tables.is_table_path(path):
      assert x.sharding.memory_kind == "pinned_host"
      assert tuple(x.sharding.spec) == (("memory", None) if row else (None, "memory"))
      assert x.addressable_shards[0].data.shape == (
          (x.shape[0] // 4, x.shape[1]) if row else (x.shape[0], x.shape[1] // 4))


# ------------------------------------------------------------ what moves

def lowered_main(mode: str, batch: int = 2) -> str:
  cfg = model_cfg("ultramem_v2", "model.memory.table_memory=host",
                  f"model.memory.host_read={mode}")
  with use_mesh(single_device_mesh()):
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    params = host_tables.tables_to_host(params)
    cache = KVCache.create(cfg, batch, 8, jnp.zeros(batch, jnp.int32))
    text = extend_and_sample.lower(
        graphdef, params, cache, jnp.zeros((batch, 1), jnp.int32),
        jnp.arange(batch), jax.random.key(0), temperature=0.0, top_p=1.0,
        phase="decode").as_text()
  main = text[text.index("func.func public @main"):]
  return main[:main.index("\n  }\n")]


def host_args(main: str) -> list[str]:
  header = main.splitlines()[0]
  return re.findall(r'(%arg\d+): tensor<[^>]*> \{mhlo.memory_kind = "pinned_host"', header)


def host_calls(main: str) -> list[tuple[str, str]]:
  """(operands, result type) of each call marked to run on the host."""
  return re.findall(r'call @\w+\(([^)]*)\) \{mhlo.frontend_attributes = '
                    r'\{_xla_compute_type = "host"\}\} : \([^)]*\) -> (tensor<[^>]*>)',
                    main)


@pytest.mark.parametrize("mode,results", [
    # rows: per layer the kept rows of V [B, S, Dv] and of P [B, S, Dp].
    ("rows", ["tensor<2x4x16xf32>"] * 4),
    # sum: per layer only the read output [B, Dv].
    ("sum", ["tensor<2x16xf32>"] * 2)])
def test_decode_step_moves_only_the_kept_rows(mode, results):
  """The decode step's only host-memory inputs are the 2 layers' V and P
  (36 rows each), each used by host computations only; what those return
  to the device is [batch 2, slots 4, width 16] rows per table (rows), or
  the [2, 16] read output per layer (sum)."""
  main = lowered_main(mode)
  args = host_args(main)
  assert len(args) == 4
  calls = host_calls(main)
  assert sorted(r for _, r in calls) == sorted(results)
  body = main.splitlines()[1:]
  for arg in args:
    uses = [line for line in body if re.search(rf"{arg}\b", line)]
    assert uses and all('_xla_compute_type = "host"' in line for line in uses)


@pytest.mark.parametrize("mode", ["rows", "sum"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_host_read_lowers_for_gpu_and_tpu(mode, platform):
  """The host read (gelu pre-value activation, E = 4 blocks) lowers for a
  GPU and a TPU from the CPU, with its table reads marked as host
  computations (StableHLO: XLA's host offloading runs when compiling on
  the device, which needs one)."""
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  spec = lambda shape, dtype=jnp.float32, sharding=None: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding)
  read = HostRead(mode, "gelu", 4)
  text = jax.jit(lambda s, w, v, b, z, p: read.read(s, w, v, b, z, p)).trace(
      spec((4, 6), jnp.int32), spec((4, 6, 2)), spec((64, 16), sharding=host),
      spec((4, 6), jnp.int32), spec((4, 8)), spec((64, 8), sharding=host)
  ).lower(lowering_platforms=(platform,)).as_text()
  main = text[text.index("func.func public @main"):].splitlines()[0]
  assert main.count('mhlo.memory_kind = "pinned_host"') == 2
  assert len(host_calls(text)) == (1 if mode == "sum" else 2)


# ------------------------------------------------------------ refusals

def test_training_refuses_host_tables(tmp_path):
  cfg = load_config(V2_CFG[0], [*SMALL, *V2_CFG[1], "model.memory.table_memory=host",
                                f"train.run_dir={tmp_path / 'run'}"])
  with pytest.raises(ConfigError, match="model.memory.table_memory: got 'host'; "
                                        "training keeps the tables"):
    train(cfg, log=lambda s: None)
  assert not (tmp_path / "run").exists()


def test_scanned_layers_refuse_host_tables():
  with pytest.raises(ConfigError, match="model.memory.table_memory: got 'host' "
                                        "with model.scan_layers=true"):
    model_cfg("ultramem_v2", "model.memory.table_memory=host",
              "model.scan_layers=true")


# ------------------------------------------------------------ a trained run

@pytest.fixture(scope="module")
def trained_v2(tmp_path_factory, text_dir):
  return train_small_run(V2_CFG[0], [*SMALL, *V2_CFG[1]],
                         tmp_path_factory.mktemp("host") / "run", text_dir, steps=2)


def test_cli_generates_the_same_text_with_host_tables(trained_v2, capsys):
  main = importlib.import_module("eval").main
  texts = []
  for where in ("device", "host"):
    assert main(["generate", "--run_dir", str(trained_v2), "--prompt", "The cat",
                 "--prompt", "A", "--max_new_tokens", "6", "--no_progress",
                 f"model.memory.table_memory={where}"]) == 0
    texts.append(capsys.readouterr().out)
  assert texts[0] == texts[1] and "=== sample 2 of 2 ===" in texts[1]


def test_restore_places_tables_on_the_host_and_the_harness_accepts_it(trained_v2):
  """restore_run puts the tables (and their Adam moments) straight into
  pinned_host; the lm-eval model's loglikelihoods equal device's."""
  restored = restore_run(trained_v2, None, ["model.memory.table_memory=host"])
  kinds = table_kinds(restored.state)
  assert len(kinds) == 3 * 4 and set(kinds.values()) == {"pinned_host"}
  others = [x.sharding.memory_kind for p, x in
            jax.tree_util.tree_flatten_with_path(restored.state)[0]
            if not host_tables.is_table_path(p) and isinstance(x, jax.Array)]
  assert set(others) == {"device"}
  requests = [Instance("loglikelihood", {}, args, i) for i, args in
              enumerate([("The cat", " sat on"), ("A", " dog")])]
  scores = [UltraMemLM.from_run(trained_v2, overrides=o, progress=False
                                ).loglikelihood(requests)
            for o in ([], ["model.memory.table_memory=host"])]
  assert scores[0] == scores[1]


def test_refused_without_pinned_host_memory(trained_v2, monkeypatch):
  monkeypatch.setattr(host_tables, "memory_kinds", lambda d: {"device"})
  with pytest.raises(ConfigError, match=r"model.memory.table_memory: got 'host', "
                                        r"but the cpu device 0 has no pinned_host"):
    restore_run(trained_v2, None, ["model.memory.table_memory=host"])


def test_refused_when_the_host_cannot_hold_the_tables(trained_v2, monkeypatch):
  monkeypatch.setattr(memory_budget, "_meminfo_available", lambda: 1000)
  with pytest.raises(ConfigError, match=r"model.memory.table_memory: got 'host'; "
                                        r"this process's shards .* need"):
    restore_run(trained_v2, None, ["model.memory.table_memory=host"])
