"""Test setup: 8 emulated CPU devices and small generated text, no network."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

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
