"""Tests for ultramem_jax.config: YAML files with `base:` chains, dotted overrides, validation."""

from __future__ import annotations

import copy
import dataclasses
import pathlib

import pytest
import yaml

from ultramem_jax.config import ConfigError, apply_overrides
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.model.config import FFNConfig
from ultramem_jax.parallel.mesh import MeshConfig, check_mesh, mesh_shape
from ultramem_jax.training.config import (Config, ParamGroupConfig, TrainConfig, from_dict,
                                          load_config, save_config, validate)

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_dense.yaml"
BASE = REPO / "configs" / "base.yaml"


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def _leaves(data: dict, prefix: str = ""):
  """(dotted key, value) of every non-mapping value in plain YAML data."""
  for k, v in data.items():
    key = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      yield from _leaves(v, key)
    else:
      yield key, v


def _get(cfg, dotted: str):
  for part in dotted.split("."):
    cfg = getattr(cfg, part)
  return cfg


def _error(path, overrides=()) -> str:
  with pytest.raises(ConfigError) as err:
    load_config(path, list(overrides))
  return str(err.value)


# ----------------------------------------------------------------------------- files

def test_tiny_dense_hand_written_values():
  cfg = load_config(TINY)
  # from tiny_dense.yaml
  assert cfg.model.d_model == 128 and cfg.model.n_layers == 4 and cfg.model.n_heads == 4
  assert cfg.model.ffn == FFNConfig(kind="dense", inner_dim=384)
  assert (cfg.data.seq_len, cfg.data.batch_size) == (128, 32)
  assert cfg.optimizer.lr == 0.003 and cfg.optimizer.warmup_steps == 30
  assert cfg.train.steps == 300 and cfg.train.run_dir == "runs/tiny_dense"
  assert cfg.train.eval_every == 100 and cfg.train.checkpoint_every == 100
  # inherited from base.yaml
  assert cfg.optimizer.b2 == 0.95 and cfg.optimizer.eps == 1e-8 and cfg.optimizer.weight_decay == 0.1
  assert cfg.data.source == "wiki" and cfg.data.tokenizer == "bpe" and cfg.data.bpe_vocab_size == 4096
  assert cfg.model.tie_embeddings is True and cfg.model.dtype == "float32"
  assert cfg.mesh == MeshConfig(data=-1, fsdp=1, tensor=1, expert=1, memory=1)
  assert cfg.train.log_every == 10 and cfg.train.max_to_keep == 3
  # in neither file: dataclass defaults
  assert cfg.model.n_kv_heads == 0 and cfg.model.kv_heads == 4 and cfg.model.attn_head_dim == 32
  assert cfg.train.resume is None and cfg.train.eval_batches == 0
  assert cfg.optimizer.param_groups == {"default": ParamGroupConfig(),
                                        "no_decay": ParamGroupConfig(weight_decay=False),
                                        "values": ParamGroupConfig()}


def test_tiny_dense_matches_every_value_written_in_the_files():
  base = yaml.safe_load(BASE.read_text())
  tiny = yaml.safe_load(TINY.read_text())
  assert tiny.pop("base") == "base.yaml"
  expected = dict(_leaves(base))
  expected.update(_leaves(tiny))  # tiny_dense wins
  assert len(expected) > 30
  cfg = load_config(TINY)
  for key, value in expected.items():
    assert _get(cfg, key) == value, key


def test_base_chain_of_three_files_merges_mappings_key_by_key(tmp_path):
  _write(tmp_path / "root" / "root.yaml", """
model:
  d_model: 64
  n_layers: 6
  ffn: {kind: dense, inner_dim: 256}
optimizer:
  lr: 1.0e-2
  param_groups:
    default: {lr_multiplier: 1.0}
    no_decay: {weight_decay: false}
train: {steps: 50, seed: 7}
""")
  _write(tmp_path / "mid" / "mid.yaml", """
base: ../root/root.yaml
model:
  n_layers: 2
  ffn: {inner_dim: 512}
optimizer:
  warmup_steps: 5
  param_groups:
    values: {lr_multiplier: 8.0, multiplier_decay_steps: 20}
""")
  top = _write(tmp_path / "top.yaml", """
base: mid/mid.yaml
model: {d_model: 96}
train: {steps: 40}
""")
  cfg = load_config(top)
  assert cfg.model.d_model == 96  # top
  assert cfg.model.n_layers == 2  # mid over root
  assert cfg.model.ffn == FFNConfig(kind="dense", inner_dim=512)  # kind from root, inner_dim from mid
  assert cfg.optimizer.lr == 0.01 and cfg.optimizer.warmup_steps == 5
  assert cfg.optimizer.param_groups == {
    "default": ParamGroupConfig(),
    "no_decay": ParamGroupConfig(weight_decay=False),
    "values": ParamGroupConfig(lr_multiplier=8.0, multiplier_decay_steps=20),
  }
  assert cfg.train.steps == 40 and cfg.train.seed == 7
  assert cfg.train.run_dir == TrainConfig().run_dir  # untouched default


def test_base_cycle_raises(tmp_path):
  a = _write(tmp_path / "a.yaml", "base: b.yaml\ntrain: {steps: 10}\n")
  _write(tmp_path / "b.yaml", "base: a.yaml\n")
  assert "cycle" in _error(a)
  me = _write(tmp_path / "self.yaml", "base: self.yaml\n")
  assert "cycle" in _error(me)


def test_missing_base_names_the_path(tmp_path):
  top = _write(tmp_path / "top.yaml", "base: sub/nope.yaml\n")
  message = _error(top)
  assert str((tmp_path / "sub" / "nope.yaml").resolve()) in message and "does not exist" in message
  missing = tmp_path / "absent.yaml"
  assert str(missing.resolve()) in _error(missing)


def test_invalid_yaml_and_non_mapping_files(tmp_path):
  bad = _write(tmp_path / "bad.yaml", "model: [d_model: 1\n")
  message = _error(bad)
  assert str(bad.resolve()) in message and "not valid YAML" in message
  lst = _write(tmp_path / "list.yaml", "- model\n- data\n")
  message = _error(lst)
  assert str(lst.resolve()) in message and "expected a mapping at top level" in message
  # a base that is not a path string
  nb = _write(tmp_path / "nb.yaml", "base: [a, b]\n")
  assert "base" in _error(nb)


def test_empty_file_and_no_file_give_defaults(tmp_path):
  assert load_config(_write(tmp_path / "empty.yaml", "")) == Config()
  assert load_config(None) == Config()


# ----------------------------------------------------------------------------- overrides

def test_overrides_typed_and_win_over_files():
  cfg = load_config(TINY, ["optimizer.lr=1e-3", "train.steps=200", "train.resume=false",
                           "data.source=/some/path", "model.ffn.kind=dense", "mesh.data=2"])
  assert cfg.optimizer.lr == 0.001 and type(cfg.optimizer.lr) is float  # YAML reads "1e-3" as a string
  assert cfg.train.steps == 200 and type(cfg.train.steps) is int
  assert cfg.train.resume is False
  assert cfg.data.source == "/some/path"
  assert cfg.model.ffn == FFNConfig(kind="dense", inner_dim=384)  # sibling from the file kept
  assert cfg.mesh.data == 2
  assert load_config(TINY, ["train.resume=true"]).train.resume is True
  assert load_config(TINY, ["train.resume=null"]).train.resume is None
  assert load_config(TINY, ["train.resume=false", "train.resume=null"]).train.resume is None
  assert load_config(TINY, ["train.steps=200", "train.steps=250"]).train.steps == 250  # last wins
  assert load_config(TINY, ["optimizer.lr=2"]).optimizer.lr == 2.0  # int accepted for a float
  assert load_config(TINY, ["model.rope_theta=5e5"]).model.rope_theta == 500000.0
  assert load_config(TINY, ["data.source= spaced value "]).data.source == "spaced value"
  # everything not overridden keeps the file's value
  base = load_config(TINY)
  over = load_config(TINY, ["optimizer.lr=1e-3"])
  assert dataclasses.replace(over, optimizer=dataclasses.replace(over.optimizer, lr=base.optimizer.lr)) == base


def test_override_param_group_mapping_merges_onto_the_defaults():
  cfg = load_config(TINY, ["optimizer.param_groups={default: {lr_multiplier: 2}, "
                           "values: {lr_multiplier: 4, weight_decay: false}}"])
  assert cfg.optimizer.param_groups == {
    "default": ParamGroupConfig(lr_multiplier=2.0),
    "no_decay": ParamGroupConfig(weight_decay=False),
    "values": ParamGroupConfig(lr_multiplier=4.0, weight_decay=False),
  }


def test_override_adds_param_group_with_defaults():
  cfg = load_config(TINY, ["optimizer.param_groups.values.lr_multiplier=4"])
  assert cfg.optimizer.param_groups == {
    "default": ParamGroupConfig(),
    "no_decay": ParamGroupConfig(weight_decay=False),
    "values": ParamGroupConfig(lr_multiplier=4.0, multiplier_decay_steps=0, weight_decay=True),
  }


def test_override_of_a_default_group_keeps_its_other_fields():
  cfg = load_config(TINY, ["optimizer.param_groups.no_decay.lr_multiplier=2"])
  assert cfg.optimizer.param_groups["no_decay"] == ParamGroupConfig(
    lr_multiplier=2.0, weight_decay=False)


def test_override_adds_param_group_when_file_defines_groups(tmp_path):
  path = _write(tmp_path / "groups.yaml", f"""
base: {TINY}
optimizer:
  param_groups:
    default: {{}}
    no_decay: {{weight_decay: false}}
""")
  cfg = load_config(path, ["optimizer.param_groups.values.lr_multiplier=4"])
  assert cfg.optimizer.param_groups == {
    "default": ParamGroupConfig(),
    "no_decay": ParamGroupConfig(weight_decay=False),
    "values": ParamGroupConfig(lr_multiplier=4.0, multiplier_decay_steps=0, weight_decay=True),
  }


@pytest.mark.parametrize("text", ["optimizer.lr", "train.steps 200", ""])
def test_override_without_equals(text):
  message = _error(TINY, [text])
  assert repr(text) in message and "dotted.key=value" in message


@pytest.mark.parametrize("text", ["optimizer..lr=1", ".lr=1", "train.=1"])
def test_override_with_empty_key_component(text):
  message = _error(TINY, [text])
  assert repr(text) in message and "empty key component" in message


# ----------------------------------------------------------------------------- unknown keys and types

def test_unknown_top_level_key():
  message = _error(TINY, ["modle.d_model=3"])
  assert message.startswith("modle:")
  assert "{'d_model': 3}" in message
  assert "model, data, optimizer, train, mesh" in message


def test_unknown_nested_key():
  message = _error(TINY, ["model.ffn.foo=1"])
  assert "model.ffn.foo" in message and "value 1" in message and "kind, inner_dim" in message
  message = _error(TINY, ["train.stpes=5"])
  assert "train.stpes" in message and "value 5" in message
  assert ", ".join(f.name for f in dataclasses.fields(TrainConfig)) in message


def test_unknown_key_inside_a_file(tmp_path):
  path = _write(tmp_path / "c.yaml", f"base: {TINY}\nmodel:\n  ffn:\n    foo: bar\n")
  message = _error(path)
  assert "model.ffn.foo" in message and "'bar'" in message and "kind, inner_dim" in message
  path = _write(tmp_path / "d.yaml", "optimizer:\n  param_groups:\n    default: {lr_mult: 2}\n")
  message = _error(path)
  assert "optimizer.param_groups.default.lr_mult" in message and "value 2" in message
  assert "lr_multiplier, multiplier_decay_steps, weight_decay" in message


@pytest.mark.parametrize("override,key,value,allowed", [
  ("train.steps=abc", "train.steps", "'abc'", "an integer"),
  ("train.steps=1.5", "train.steps", "1.5", "an integer"),
  ("train.steps=true", "train.steps", "True", "an integer"),
  ("model.tie_embeddings=3", "model.tie_embeddings", "3", "true or false"),
  ("model.tie_embeddings=yes please", "model.tie_embeddings", "'yes please'", "true or false"),
  ("model.dtype=float16", "model.dtype", "'float16'", "'float32', 'bfloat16'"),
  ("data.tokenizer=wordpiece", "data.tokenizer", "'wordpiece'", "'bpe', 'bytes'"),
  ("optimizer.lr=fast", "optimizer.lr", "'fast'", "a number"),
  ("optimizer.lr=true", "optimizer.lr", "True", "a number"),
  ("train.resume=maybe", "train.resume", "'maybe'", "true or false or null"),
  ("data.source=3", "data.source", "3", "a string"),
  ("model.ffn=dense", "model.ffn", "'dense'", "a mapping with keys kind, inner_dim"),
])
def test_wrong_type(override, key, value, allowed):
  message = _error(TINY, [override])
  assert message.startswith(key + ":"), message
  assert value in message and allowed in message, message


# ----------------------------------------------------------------------------- combinations

@pytest.mark.parametrize("overrides,key", [
  (["model.n_heads=3"], "model.n_heads"),  # 3 does not divide 128
  (["model.n_kv_heads=3"], "model.n_kv_heads"),  # 3 does not divide 4
  (["model.d_model=120", "model.n_heads=8"], "model.head_dim"),  # head width 15
  (["model.head_dim=7"], "model.head_dim"),
  (["train.steps=30"], "optimizer.warmup_steps"),  # warmup 30 from the file
  (["optimizer.warmup_steps=400"], "optimizer.warmup_steps"),
  (["data.val_fraction=0"], "data.val_fraction"),
  (["data.val_fraction=1"], "data.val_fraction"),
  (["data.val_fraction=1.5"], "data.val_fraction"),
  (["data.val_fraction=-0.1"], "data.val_fraction"),
  (["optimizer.lr=-1e-3"], "optimizer.lr"),
  (["optimizer.lr=0"], "optimizer.lr"),
  (["mesh.memory=-1"], "mesh.memory"),  # data is already -1
  (["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=-1"], "mesh.tensor"),
  (["mesh.tensor=0"], "mesh.tensor"),
  (["mesh.data=-2"], "mesh.data"),
  (["optimizer.param_groups={default: {lr_multiplier: 0}}"], "optimizer.param_groups.default.lr_multiplier"),
  (["train.steps=0"], "train.steps"),
  (["data.bpe_vocab_size=100"], "data.bpe_vocab_size"),
])
def test_bad_combination_names_the_key(overrides, key):
  message = _error(TINY, overrides)
  assert message.startswith(key + ":"), message


def test_bad_combination_messages_say_what_is_allowed():
  assert "must divide model.d_model=128" in _error(TINY, ["model.n_heads=3"])
  assert "must divide model.n_heads=4" in _error(TINY, ["model.n_kv_heads=3"])
  assert "even head width" in _error(TINY, ["model.head_dim=7"])
  assert "smaller than train.steps=30" in _error(TINY, ["train.steps=30"])
  assert "strictly between 0 and 1" in _error(TINY, ["data.val_fraction=0"])
  assert "['data', 'memory']" in _error(TINY, ["mesh.memory=-1"])


def test_missing_default_param_group_is_refused():
  # Files and overrides merge onto the built-in groups, so only a Config
  # built in code can lack 'default'.
  cfg = load_config(TINY)
  cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(
      cfg.optimizer, param_groups={"no_decay": ParamGroupConfig(weight_decay=False)}))
  with pytest.raises(ConfigError, match="optimizer.param_groups.*'default'"):
    validate(cfg)


def test_valid_edge_values_are_accepted():
  cfg = load_config(TINY, ["train.steps=31", "data.val_fraction=0.999", "model.n_kv_heads=2",
                           "model.d_model=120", "model.n_heads=6", "mesh.data=1", "mesh.memory=-1",
                           "data.tokenizer=bytes", "data.bpe_vocab_size=1"])
  assert cfg.optimizer.warmup_steps == 30 and cfg.train.steps == 31
  assert cfg.model.attn_head_dim == 20
  # head_dim given explicitly: n_heads need not divide d_model
  cfg = load_config(TINY, ["model.n_heads=3", "model.head_dim=32"])
  assert cfg.model.attn_head_dim == 32


# ----------------------------------------------------------------------------- no aliasing

MQAR = REPO / "configs" / "tiny_mqar_moe.yaml"
NESTED = {
    "model": {"d_model": 64, "ffn": {"kind": "moe", "moe": {"num_experts": 8, "top_k": 2}},
              "memory": {"layers": ""}},
    "data": {"tokenizer": "bytes", "seq_len": 32, "tasks": "mqar",
             "task_params": {"mqar": {"num_pairs": [2, 4]}}},
    "optimizer": {"param_groups": {"values": {"lr_multiplier": 4.0}}},
    "train": {"steps": 40},
}
OVERRIDES = ["model.ffn.moe.top_k=4", "data.task_params.mqar.num_pairs=[3, 5]",
             "optimizer.param_groups.values.lr_multiplier=2", "model.memory.n_keys=8",
             "train.new_section.key=1"]


def test_apply_overrides_leaves_its_input_unchanged():
  data, overrides = copy.deepcopy(NESTED), list(OVERRIDES)
  out = apply_overrides(data, overrides)
  assert data == NESTED and overrides == OVERRIDES
  assert out["model"]["ffn"]["moe"]["top_k"] == 4
  assert out["data"]["task_params"]["mqar"]["num_pairs"] == [3, 5]
  assert out["optimizer"]["param_groups"]["values"]["lr_multiplier"] == 2
  # Nothing of the result is the input's: changing one leaves the other alone.
  out["data"]["task_params"]["mqar"]["num_pairs"].append(9)
  out["model"]["ffn"]["moe"]["num_experts"] = 1
  assert data == NESTED


def test_from_dict_leaves_its_input_unchanged_and_shares_nothing_with_it():
  data = copy.deepcopy(NESTED)
  cfg = from_dict(data)
  assert data == NESTED
  assert cfg.data.task_params == {"mqar": {"num_pairs": [2, 4]}}
  assert cfg.data.task_params is not data["data"]["task_params"]
  assert (cfg.data.task_params["mqar"]["num_pairs"]
          is not data["data"]["task_params"]["mqar"]["num_pairs"])
  cfg.data.task_params["mqar"]["num_pairs"].append(8)   # plain data inside a frozen section
  assert data == NESTED


def test_load_config_leaves_its_file_and_overrides_unchanged(tmp_path):
  path = _write(tmp_path / "child.yaml", f"base: {MQAR}\nmodel:\n  d_model: 64\n")
  text, base_text = path.read_text(), MQAR.read_text()
  overrides = list(OVERRIDES[:4])
  a = load_config(path, overrides)
  assert overrides == OVERRIDES[:4]
  assert path.read_text() == text and MQAR.read_text() == base_text
  b = load_config(path, overrides)
  assert a == b and a.data.task_params["mqar"]["num_pairs"] == [3, 5]


def test_building_twice_gives_equal_independent_configs():
  a, b = from_dict(NESTED), from_dict(NESTED)
  assert a == b and a is not b
  for get in (lambda c: c.model, lambda c: c.model.ffn.moe, lambda c: c.model.memory,
              lambda c: c.data, lambda c: c.data.task_params,
              lambda c: c.data.task_params["mqar"]["num_pairs"],
              lambda c: c.optimizer.param_groups, lambda c: c.optimizer.param_groups["values"],
              lambda c: c.train, lambda c: c.mesh):
    assert get(a) == get(b) and get(a) is not get(b)
  a.data.task_params["mqar"]["num_pairs"].append(8)
  assert b == from_dict(NESTED) and a != b


@pytest.mark.parametrize("section", ["model", "model.ffn", "model.ffn.moe", "model.memory", "data",
                                     "optimizer", "train", "mesh"])
def test_configs_are_frozen_once_built(section):
  cfg = load_config(TINY)
  node = cfg
  for part in section.split("."):
    node = getattr(node, part)
  name = dataclasses.fields(node)[0].name
  with pytest.raises(dataclasses.FrozenInstanceError):
    setattr(node, name, getattr(node, name))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.model = cfg.model
  assert isinstance(cfg.optimizer.param_groups["default"], ParamGroupConfig)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.optimizer.param_groups["default"].lr_multiplier = 2.0


# ----------------------------------------------------------------------------- save / load

def test_save_then_load_round_trip(tmp_path):
  cfg = load_config(TINY, ["optimizer.lr=1e-3", "train.resume=false", "data.source=/some/path",
                           "optimizer.param_groups={default: {}, no_decay: {weight_decay: false}, "
                           "values: {lr_multiplier: 4, multiplier_decay_steps: 100}}",
                           "mesh.data=2", "mesh.memory=-1", "model.n_kv_heads=2", "optimizer.eps=1e-12"])
  path = tmp_path / "config.yaml"
  save_config(cfg, path)
  assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # the temp file was renamed
  again = load_config(path)
  assert again == cfg
  assert isinstance(again.optimizer.param_groups["values"], ParamGroupConfig)
  assert again.optimizer.eps == 1e-12 and again.train.resume is False
  save_config(Config(), path)  # overwrite; defaults (resume: null) also round-trip
  assert load_config(path) == Config()


def test_saved_file_is_plain_yaml_of_every_field(tmp_path):
  cfg = load_config(TINY)
  save_config(cfg, tmp_path / "c.yaml")
  data = yaml.safe_load((tmp_path / "c.yaml").read_text())
  assert list(data) == ["model", "data", "optimizer", "train", "mesh"]
  assert data["model"]["ffn"]["kind"] == "dense" and data["model"]["ffn"]["inner_dim"] == 384
  assert data["model"]["ffn"]["moe"]["num_experts"] == 64
  assert data["optimizer"]["param_groups"]["no_decay"] == {
    "lr_multiplier": 1.0, "multiplier_decay_steps": 0, "weight_decay": False}
  assert set(data["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}


# ----------------------------------------------------------------------------- mesh

def test_mesh_minus_one_fills_the_rest():
  assert mesh_shape(MeshConfig(data=-1, memory=4), 8) == (2, 1, 1, 1, 4)
  assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2, 1, 1)
  assert mesh_shape(MeshConfig(), 1) == (1, 1, 1, 1, 1)
  assert mesh_shape(MeshConfig(), 16) == (16, 1, 1, 1, 1)
  assert mesh_shape(MeshConfig(data=2, tensor=4), 8) == (2, 1, 4, 1, 1)  # no -1, exact product
  assert MeshConfig().axis_names == ("data", "fsdp", "tensor", "expert", "memory")


def test_mesh_product_must_equal_device_count():
  with pytest.raises(ConfigError) as err:
    mesh_shape(MeshConfig(data=2, memory=2), 8)
  message = str(err.value)
  assert "data=2, fsdp=1, tensor=1, expert=1, memory=2" in message
  assert "use 4 devices" in message and "8 are available" in message
  with pytest.raises(ConfigError, match="use 16 devices but 8 are available"):
    mesh_shape(MeshConfig(data=4, tensor=4), 8)


def test_mesh_minus_one_that_cannot_be_filled():
  with pytest.raises(ConfigError) as err:
    mesh_shape(MeshConfig(data=-1, memory=3), 8)
  message = str(err.value)
  assert message.startswith("mesh.data:") and "3" in message and "8" in message
  with pytest.raises(ConfigError, match=r"^mesh\.expert:"):
    mesh_shape(MeshConfig(data=4, expert=-1), 2)


def test_check_mesh_is_the_one_check_of_a_mesh_against_a_config():
  cfg = load_config(TINY, ["mesh.memory=3", "data.batch_size=30"])
  model = abstract_model(cfg)
  assert check_mesh(cfg, model, 6) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 1,
                                       "memory": 3}
  with pytest.raises(ConfigError, match=r"^mesh\.data: -1 cannot be filled"):
    check_mesh(cfg, model, 8)
  cfg = load_config(TINY, ["mesh.memory=4"])
  with pytest.raises(ConfigError, match=r"data.batch_size: got 32; must be divisible by "
                     r"mesh.data \* mesh.fsdp \* mesh.expert \* mesh.memory = 64"):
    check_mesh(cfg, model, 64)
  assert check_mesh(cfg, model, 64, batch=False)["data"] == 16   # inspect counts, no batch
  cfg = load_config(TINY, ["mesh.data=1", "mesh.tensor=8"])
  with pytest.raises(ConfigError, match=r"mesh.tensor: 8 shards do not divide"):
    check_mesh(cfg, abstract_model(cfg), 8)
