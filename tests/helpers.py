"""Shared test inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax.params import init_params


def perturbed_params(c, seed=0):
  """init_params with non-zero b / b_a so zero init cannot hide a bug."""
  p = init_params(c, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  layer = p["layers"]  # stacked: every array [L, ...]
  if "plga" in layer:
    for name in ("b", "b_a"):
      layer["plga"][name] = jnp.asarray(
          0.05 * rng.standard_normal(layer["plga"][name].shape), layer["plga"][name].dtype)
  return p


def child_script(name: str) -> str:
  """The path of tests/children/<name>.py: a script a test runs in a fresh process
  (`[sys.executable, child_script(name), *argv]`)."""
  from pathlib import Path
  path = Path(__file__).resolve().parent / "children" / f"{name}.py"
  assert path.is_file(), path
  return str(path)


def random_tokens(c, shape, seed=1):
  """Token ids in [4, vocab): no special tokens."""
  return jnp.asarray(np.random.default_rng(seed).integers(4, c.vocab_size, shape), jnp.int32)


def load_script(relpath: str, name: str | None = None, *, once: bool = False):
  """A repo script (e.g. 'experiments/less_eval.py') imported as a module.

  once=True: registered in sys.modules under `name` and reused (a script whose
  gin configurables may only be registered once per process).
  """
  import importlib.util
  import sys
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / relpath
  name = name or path.stem
  if once and name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if once:
    sys.modules[name] = mod
  return mod


def write_tiny_run(root, *, g_mode: str = "learned", recorded: str = "run"):
  """A run directory as the trainer leaves it (checkpoints/<step> with the configs in
  meta, the tokenizer under <root>/data/tokenizer) for a randomly initialised tiny
  model that uses the published tokenizer. Returns its path.

  recorded: how the meta names the tokenizer. "run": relative to the run folder, as
  pretrain.py writes it; "cwd": relative to the working directory, as runs written
  before relocatable run folders did; "absolute".
  """
  import dataclasses
  import os
  import shutil
  from pathlib import Path
  from pldr_jax.training import checkpoint
  from pldr_jax import config, params, paths
  from pldr_jax.config import DataConfig
  root = Path(root)
  published = Path(__file__).resolve().parents[1] / "data" / "published" / "pldr-refinedweb-32k.model"
  tok = root / "data" / "tokenizer" / published.name
  tok.parent.mkdir(parents=True, exist_ok=True)
  shutil.copy(published, tok)
  tok_path = {"run": paths.record(tok, root), "cwd": os.path.relpath(tok),
              "absolute": str(tok.resolve())}[recorded]
  c = config.tiny(vocab_size=32000, max_len=64, g_mode=g_mode)
  data = DataConfig(tokenizer_path=tok_path, vocab_size=32000, seq_len=64)
  with checkpoint.Checkpointer(root / "checkpoints", async_save=False) as ck:
    ck.save(1, params=params.init_params(c, jax.random.key(0)), opt_state={}, data_state={},
            meta={"model": dataclasses.asdict(c), "data": dataclasses.asdict(data)})
  return root


def write_hf_cache(cache, repo_id: str, folder, *, revision: str = "main"):
  """Put the files of `folder` (a Hugging Face folder, e.g. written by compat.hf.save_hf)
  into a Hugging Face hub cache at `cache` as model `repo_id`, the way huggingface_hub
  leaves a download (and reads it back in offline mode):

      models--{org}--{name}/blobs/<sha256 of the file>        the bytes
      models--{org}--{name}/snapshots/<commit>/<file>         -> ../../blobs/<sha256>
      models--{org}--{name}/refs/<revision>                   <commit> (no newline)

  Returns the snapshot folder.
  """
  import hashlib
  import os
  from pathlib import Path
  repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
  commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()  # 40 hex digits
  snapshot = repo / "snapshots" / commit
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  snapshot.mkdir(parents=True, exist_ok=True)
  for f in sorted(Path(folder).iterdir()):
    data = f.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / revision).write_text(commit)
  return snapshot
