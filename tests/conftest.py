"""Test setup: 8 emulated CPU devices and small generated text, no network."""

import contextlib
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, shared by both
# pytest workers and every train.py / eval.py the tests start (they inherit
# the environment): the same tiny programs are compiled again and again, by
# each subprocess and by each in-process train(), and a cached executable is
# the one XLA compiled, so no result changes (the key covers the program,
# the XLA flags, the devices and the JAX version). A subprocess keeps every
# program (JAX's default keeps only those over 1 s to compile; a train.py
# run of a tiny config compiles about 180 programs, nearly all shorter, and
# reading them back cuts its CPU time from about 7 s to 4 s). A size limit
# turns on JAX's file lock, so a process never reads an entry another is
# still writing. The directory is made fresh by the process that starts the
# session (the workers inherit it) and removed when that process ends;
# JAX_COMPILATION_CACHE_DIR= (empty) turns the cache off.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="ultramem-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
# A process killed by a test (SIGKILL) while it writes an entry leaves it
# cut short; whoever reads it then compiles the program itself, and JAX's
# warning about it must not reach the stderr the tests read.
os.environ["PYTHONWARNINGS"] = ",".join(
    [f"ignore:Error {verb} persistent compilation cache entry:UserWarning"
     for verb in ("reading", "writing")]
    + [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w])

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

# In the test processes themselves most programs are compiled once (a
# layer at one shape): only those over 0.1 s (train steps) are worth a file;
# keeping all cost test_memory_layer.py 30% more CPU time.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


# The files that take longest run first (longest first: 28-90 s each when
# measured alone on the 2-core machine, 2026-12-01, beside other jobs; the
# files not listed took less, those measured). `make test` hands each worker
# whole files in collection order (`--dist loadfile --no-loadscope-reorder`),
# so the short files fill in at the end and neither worker is left running a
# long one alone. (xdist's default order, most tests first, put the long
# end-to-end files, which have two to six tests each, last.)
LONGEST_FIRST = (
    "test_robustness.py", "test_pod_failure.py", "test_sweep_run.py",
    "test_pallas_kernels.py", "test_benchmarks.py", "test_memory_training.py",
    "test_memory_layer.py", "test_disk_full.py", "test_sharding.py",
    "test_host_tables.py", "test_moe.py",
    "test_multiprocess.py", "test_training.py", "test_scan_layers.py",
    "test_checkpoint_reshard.py", "test_grad_accum.py", "test_harness.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def environment_without_compilation_cache() -> dict[str, str]:
  """This process's environment for a subprocess that compiles everything
  itself (one whose test is about what happens while it compiles)."""
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = ""
  return env


@contextlib.contextmanager
def fresh_compiles():
  """Within the block, every program is compiled by XLA in this process,
  none read from (or written to) the session's compilation cache: for a run
  whose test compares it with another compile of the same program
  (determinism)."""
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


_WORDS = ("the a one every some cat dog bird fish tree river stone house "
          "runs sees finds eats likes carries near under over beside quickly "
          "slowly red green blue small large old new and but then").split()


def make_documents(n_docs: int, seed: int = 0, sentences=(3, 12)) -> list[str]:
  """English-like documents from a fixed word list, deterministic for a seed."""
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(n_docs):
    sents = []
    for _ in range(rng.integers(*sentences)):
      words = rng.choice(_WORDS, size=rng.integers(4, 10))
      sents.append(" ".join(words).capitalize() + ".")
    docs.append(" ".join(sents))
  return docs


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
  """A directory of 60 small .txt documents."""
  root = tmp_path_factory.mktemp("texts")
  for i, doc in enumerate(make_documents(60)):
    (root / f"doc{i:03d}.txt").write_text(doc)
  return root
