"""pldr_jax.load("hf:<org>/<model>"): a model on the Hugging Face Hub, through
huggingface_hub's real snapshot_download. The Hub is simulated by a Hugging Face cache
filled beforehand (the layout huggingface_hub leaves, tests/helpers.write_hf_cache) and
offline mode, so nothing goes to the network."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import write_hf_cache

huggingface_hub = pytest.importorskip("huggingface_hub")

import pldr_jax  # noqa: E402
from pldr_jax import config, errors, params  # noqa: E402
from pldr_jax.compat import hf  # noqa: E402
from pldr_jax.data import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "published" / "pldr-refinedweb-32k.model"
REPO_ID = "test-org/pldr-tiny"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An empty Hugging Face cache in offline mode. huggingface_hub reads HF_HOME,
  HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported: the environment is set for
  subprocesses, and its constants for this (already importing) process."""
  home = tmp_path / "hf_home"
  cache = home / "hub"
  cache.mkdir(parents=True)
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """A tiny model in the port's layout, tokenizer included, as save_hf publishes it."""
  c = config.tiny(vocab_size=32000, max_len=64)
  p = params.init_params(c, jax.random.key(0))
  folder = tmp_path_factory.mktemp("published") / "pldr-tiny"
  hf.save_hf(folder, p, c, tokenizer=TOKENIZER)
  return folder, c, p


def test_load_hf_from_the_cache_offline(hub_cache, published):
  folder, c, p = published
  snapshot = write_hf_cache(hub_cache, REPO_ID, folder)
  repos = {r.repo_id: r for r in huggingface_hub.scan_cache_dir(hub_cache).repos}
  assert set(repos) == {REPO_ID} and "main" in next(iter(repos[REPO_ID].revisions)).refs
  for spec in (f"hf:{REPO_ID}", f"hf:{REPO_ID}@main"):
    m = pldr_jax.load(spec)
    assert Path(m.source) == snapshot  # read from the cache's snapshot folder
    assert m.config == c and m.g_lm is None and m.step is None
    jax.tree.map(np.testing.assert_array_equal, m.params, p)
    assert m.tokenizer.encode("It is a truth") == load_tokenizer(TOKENIZER).encode("It is a truth")


def test_load_hf_cache_miss_offline_is_one_line(hub_cache):
  with pytest.raises(errors.CheckpointError) as info:
    pldr_jax.load("hf:test-org/not-cached")
  msg = str(info.value)
  assert "\n" not in msg and msg.startswith("hf:test-org/not-cached: not in the Hugging Face cache")
  assert "HF_HUB_OFFLINE" in msg and str(hub_cache) in msg
  assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


def test_load_hf_bad_id_and_no_huggingface_hub(hub_cache, monkeypatch):
  with pytest.raises(errors.CheckpointError, match="Hub model id"):
    pldr_jax.load("hf:just-a-name")
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
  with pytest.raises(errors.CheckpointError) as info:
    pldr_jax.load(f"hf:{REPO_ID}")
  assert "\n" not in str(info.value) and "pip install 'pldr-jax[hf]'" in str(info.value)
