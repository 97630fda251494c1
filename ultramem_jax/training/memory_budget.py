"""Whether a run's arrays can fit, checked before anything is allocated.

A size that cannot fit (``model.vocab_size=50000000``, ``eval.py generate
--max_new_tokens 100000000``) would otherwise allocate tens of GB before
XLA stops with RESOURCE_EXHAUSTED, or before the host's OOM killer ends the
process. This module computes a lower bound on the bytes a run needs from
the abstract model (``model/abstract.py``: shapes only, nothing allocated)
and refuses, with a ConfigError naming the key, a run whose bound exceeds
the memory there is:

- training: parameters, their gradients and Adam's two moments (4 x the
  parameter bytes), plus the float32 logits of one batch
  (data.batch_size x data.seq_len x vocabulary);
- generation: the restored train state (parameters and Adam's moments,
  3 x the parameter bytes), the key/value cache of every layer and the
  prefill's float32 logits.

The memory there is: on accelerators the sum over this process's devices of
``memory_stats()`` ``bytes_limit - bytes_in_use``; on CPU (which reports no
memory_stats) MemAvailable of /proc/meminfo, shared by every CPU device.
Other processes of a multi-process run are counted alike. Where neither is
known, only the vocabulary bound applies. Activations are not counted, so
a config that passes may still not fit; one that is refused cannot run.
The estimate per device with activations, under the remat policy and the
mesh, is ``memory_estimate.py`` (``inspect --memory``), for before launch.
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.config import ConfigError
from ultramem_jax.model.abstract import resolved_vocab
from ultramem_jax.model.common import dtype_of
from ultramem_jax.parallel import host_tables

# Token ids are int32 and the largest tokenizers in use have about 260k
# entries; a vocabulary beyond this is a typo, whatever memory there is.
MAX_VOCAB = 1 << 24
MEMINFO = pathlib.Path("/proc/meminfo")


def _gb(n: float) -> str:
  return f"{n / 1e9:,.1f} GB"


def _meminfo_available() -> int:
  """MemAvailable of /proc/meminfo in bytes; 0 when it cannot be read."""
  try:
    for line in MEMINFO.read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return 0


def available_bytes() -> tuple[int, str]:
  """(bytes free for arrays over the whole run, where they were counted);
  (0, "") when unknown."""
  devices = jax.local_devices()
  try:
    stats = [d.memory_stats() for d in devices]
  except Exception:  # a backend without the call; treated as unknown
    stats = [None]
  processes = jax.process_count()
  scale = f" x {processes} processes" if processes > 1 else ""
  if all(s and "bytes_limit" in s for s in stats):
    free = sum(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    where = f"free on {len(devices)} {jax.default_backend()} device(s){scale}"
  else:
    free = _meminfo_available()
    where = f"host MemAvailable in {MEMINFO}{scale}" if free else ""
  return free * processes, where


def param_bytes(model) -> tuple[int, int]:
  """(parameter count, parameter bytes) of an (abstract) model."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  count = sum(math.prod(x.shape) for x in leaves)
  return count, sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)


def check_vocab(cfg) -> None:
  """The vocabulary the run will have is at most MAX_VOCAB."""
  vocab = resolved_vocab(cfg)
  if vocab > MAX_VOCAB:
    key = "model.vocab_size" if cfg.model.vocab_size else "data.bpe_vocab_size"
    raise ConfigError(f"{key}: got {vocab}; must be at most {MAX_VOCAB:,} "
                      "(2**24; the largest tokenizers in use have about 260k "
                      "entries)")


def check_train_memory(cfg, model) -> None:
  """ConfigError unless the lower bound of training `cfg` (the root config,
  its vocabulary as `model` has it) fits the memory there is."""
  check_vocab(cfg)
  free, where = available_bytes()
  if not free:
    return
  n, nbytes = param_bytes(model)
  vocab = resolved_vocab(cfg)
  state = 4 * nbytes
  logits = 4 * cfg.data.batch_size * cfg.data.seq_len * vocab
  need = state + logits
  if need <= free:
    return
  item = jnp.dtype(dtype_of(cfg.model.param_dtype)).itemsize
  tables = 4 * vocab * cfg.model.d_model * item * (
      1 if cfg.model.tie_embeddings else 2)
  if logits + tables > need / 2:
    key = "model.vocab_size" if cfg.model.vocab_size else "data.bpe_vocab_size"
    head = f"{key}: got {vocab}"
  else:
    head = f"model: {n:,} parameters"
  raise ConfigError(
      f"{head}; training needs at least {_gb(need)} ({_gb(state)} for the "
      f"parameters, their gradients and Adam's moments, {_gb(logits)} for the "
      f"float32 logits of data.batch_size={cfg.data.batch_size} x "
      f"data.seq_len={cfg.data.seq_len} x {vocab:,} entries), but "
      f"{_gb(free)} are available ({where}); choose a smaller vocabulary, "
      "model or batch, or more devices")


def check_generate_memory(cfg, model, rows: int, prompt_len: int,
                          max_new_tokens: int) -> None:
  """ConfigError naming --max_new_tokens unless the key/value cache of
  ``prompt_len + max_new_tokens - 1`` slots for `rows` prompts, the restored
  state of `model` and the prefill's logits fit the memory there is."""
  slots = prompt_len + max_new_tokens - 1
  trained = f"the model was trained on data.seq_len={cfg.data.seq_len} tokens"
  if slots >= 2 ** 31:
    raise ConfigError(f"--max_new_tokens: got {max_new_tokens}; a key/value "
                      f"cache of {slots:,} slots exceeds the int32 positions "
                      f"(at most {2 ** 31 - 1:,}); {trained}")
  free, where = available_bytes()
  if not free:
    return
  m = cfg.model
  item = jnp.dtype(dtype_of(m.dtype)).itemsize
  cache = 2 * m.n_layers * rows * slots * m.kv_heads * m.attn_head_dim * item
  state = 3 * param_bytes(model)[1]
  logits = 4 * rows * prompt_len * resolved_vocab(cfg)
  need = cache + state + logits
  if need <= free:
    return
  raise ConfigError(
      f"--max_new_tokens: got {max_new_tokens}; with prompts of up to "
      f"{prompt_len} tokens the key/value cache needs {slots:,} slots x "
      f"{rows} row(s) = {_gb(cache)}, at least {_gb(need)} with the restored "
      f"state, but {_gb(free)} are available ({where}); ask for fewer "
      f"tokens ({trained})")


def check_host_tables(abstract_state, mesh) -> None:
  """ConfigError naming ``model.memory.table_memory`` unless every device of
  `mesh` this process drives can address ``pinned_host`` memory and the
  host can hold this process's shards of the tables of `abstract_state`
  (the restored train state: the tables and their two Adam moments), by
  MemAvailable of /proc/meminfo. Called before anything is restored or
  compiled."""
  key = "model.memory.table_memory"
  local = host_tables.local_devices(mesh)
  missing = host_tables.devices_without_host_memory(local)
  if missing:
    kinds = ", ".join(sorted(host_tables.memory_kinds(missing[0]))) or "none reported"
    raise ConfigError(
        f"{key}: got 'host', but the {missing[0].platform} device "
        f"{missing[0].id} has no {host_tables.HOST_KIND} memory (its memory kinds: "
        f"{kinds}); use {key}=device")
  need = host_tables.host_table_bytes(abstract_state, mesh)
  free = _meminfo_available()
  if free and need > free:
    raise ConfigError(
        f"{key}: got 'host'; this process's shards of the tables and their "
        f"optimizer moments need {_gb(need)} of host memory ({len(local)} "
        f"device(s)), but {_gb(free)} are available (MemAvailable in "
        f"{MEMINFO}); shard the tables over more hosts (mesh.memory) or use "
        f"{key}=device")
