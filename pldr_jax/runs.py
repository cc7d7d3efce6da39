"""One way to load a model: a trained run or a published checkpoint, ready to decode.

    import pldr_jax
    config, params, g_lm, tokenizer = pldr_jax.load("runs/tiny")
    m = pldr_jax.load("path/to/hub_folder")        # config.json + model.safetensors
    m = pldr_jax.load("hf:fromthesky/PLDR-LLM-v51-110M-1")   # a model on the Hugging Face Hub
    m.config, m.params, m.g_lm, m.tokenizer, m.step, m.data

`path` may be
  * a pldr-jax run directory (holding `checkpoints/`) or its `checkpoints/`
    directory: the configs come from the checkpoint's meta, then only the
    parameters are restored (on the default device), with the constant G_LM of
    a fixed-G run ('random', 'transferred'); the tokenizer is the run's;
  * a Hugging Face folder of the PLDR-LLM port (config.json +
    model.safetensors), a torch distributed-checkpoint folder, or a `.pth` /
    `.pt` / `.bin` / `.safetensors` file in the authors' layout
    (`pldr_jax.compat.hf.load_checkpoint`); the tokenizer is `tokenizer=` or a
    `tokenizer.model` beside the weights, else None;
  * `hf:<org>/<model>` (or `hf:<org>/<model>@<revision>`): a PLDR-LLM on the
    Hugging Face Hub in the port's layout, fetched with
    `huggingface_hub.snapshot_download` (config.json, the safetensors weights
    and tokenizer.model only) into the Hugging Face cache and read from there
    as a folder. The cache, HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE
    work as for every Hub library; needs the `hf` extra (`pip install
    'pldr-jax[hf]'`). Every failure (no huggingface_hub, not cached while
    offline, no such model) is one CheckpointError line.

A run directory may be local or on object storage (`gs://bucket/run`), and
may have been moved or copied since training: the data and tokenizer paths
of its meta are resolved against the run directory (`pldr_jax.paths`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from etils import epath

from pldr_jax import paths
from pldr_jax.config import PLDRConfig
from pldr_jax.errors import CheckpointError

__all__ = ["LoadedModel", "load", "checkpoints_dir", "hub_snapshot", "HUB_PREFIX"]

HUB_PREFIX = "hf:"
# What a PLDR-LLM needs from a Hub repository: the port's config, its weights (one
# file or shards with their index) and the SentencePiece tokenizer.
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors", "tokenizer.model"]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """What `load` returns. Unpacks as (config, params, g_lm, tokenizer).

  g_lm: the constant G_LM [L, H, dk, dk] of a fixed-G model (None for learned
  and identity G); data: the run's DataConfig (None for a published file);
  step: the checkpoint step (None for a published file).
  """
  config: PLDRConfig
  params: Any
  g_lm: Any
  tokenizer: Any
  data: Any = None
  step: int | None = None
  source: str = ""

  def __iter__(self):
    return iter((self.config, self.params, self.g_lm, self.tokenizer))


def checkpoints_dir(path: str | os.PathLike) -> epath.Path | None:
  """The Orbax checkpoints directory of a run directory (or the directory itself), else None.

  path: local or a URL (`gs://...`)."""
  p = paths.as_path(path)
  if (p / "checkpoints").is_dir():
    return p / "checkpoints"
  if p.is_dir() and any(c.name.isdigit() and c.is_dir() for c in p.iterdir()):
    return p
  return None


def _hub_error(spec: str, repo_id: str, e: BaseException) -> CheckpointError:
  """A huggingface_hub failure as one line that says what to do (classes matched by name:
  their module moved between huggingface_hub releases)."""
  kinds = {c.__name__ for c in type(e).__mro__}
  from huggingface_hub import constants
  offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
  if "LocalEntryNotFoundError" in kinds or "IncompleteSnapshotError" in kinds:
    if offline:
      why = (f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
             "set: run once with network access (HF_HUB_OFFLINE=0) to download it, point "
             "HF_HOME / HF_HUB_CACHE at a cache that holds it, or load a local folder")
    else:
      why = ("the Hub could not be reached and the model is not in the Hugging Face cache "
             f"({constants.HF_HUB_CACHE}): check the network, or load a local folder")
  elif "GatedRepoError" in kinds:
    why = (f"{repo_id} is gated: accept its terms on huggingface.co and log in "
           "(`hf auth login` or HF_TOKEN)")
  elif "RepositoryNotFoundError" in kinds:
    why = (f"no model {repo_id} on the Hugging Face Hub (a typo, or a private repository: "
           "log in with `hf auth login` or set HF_TOKEN)")
  elif "RevisionNotFoundError" in kinds:
    why = f"{repo_id} has no such revision"
  elif "HFValidationError" in kinds:
    why = "not a Hub model id: write hf:<org>/<model> (optionally @<revision>)"
  else:
    first = (str(e).strip().splitlines() or [""])[0]
    why = f"downloading failed ({type(e).__name__}: {first})"
  return CheckpointError(f"{spec}: {why}")


def hub_snapshot(spec: str) -> str:
  """`hf:<org>/<model>[@<revision>]` -> the local folder of its files in the Hugging Face
  cache (`huggingface_hub.snapshot_download`, which downloads only what is not cached
  and honours HF_HUB_OFFLINE). Raises CheckpointError (one line) on any failure."""
  ref = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
  repo_id, _, revision = ref.partition("@")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise CheckpointError(f"{spec}: loading from the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'pldr-jax[hf]' (or pip install huggingface_hub)") from None
  if repo_id.count("/") != 1 or not all(repo_id.split("/")):
    raise CheckpointError(f"{spec}: not a Hub model id: write hf:<org>/<model> "
                          "(optionally @<revision>)")
  try:
    return snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES)
  except Exception as e:  # noqa: BLE001 - every huggingface_hub failure becomes one line
    raise _hub_error(spec, repo_id, e) from None


def _tokenizer(path):
  from pldr_jax.data import load_tokenizer
  return None if path is None else load_tokenizer(path)


def load(path: str | os.PathLike, *, step: int | None = None, tokenizer=None,
         **overrides) -> LoadedModel:
  """A run directory or a published checkpoint -> LoadedModel (see the module docstring).

  step: the checkpoint step of a run (default: the latest). tokenizer: a
  SentencePiece `.model` path to use instead of the run's / the folder's.
  overrides: PLDRConfig fields for a published checkpoint (e.g. g_mode,
  max_len, compute_dtype); a run's config is what it was trained with.
  """
  if isinstance(path, str) and path.startswith(HUB_PREFIX):
    folder = hub_snapshot(path)
    from pldr_jax.compat import hf
    if not os.path.isfile(os.path.join(folder, "config.json")):
      raise CheckpointError(f"{path}: the repository has no config.json: not a PLDR-LLM in "
                            "the Hugging Face port's layout (PldrllmForCausalLM)")
    try:
      config, params, g_lm = hf.load_hf(folder, **overrides)
    except CheckpointError as e:
      raise CheckpointError(f"{path}: {e}") from None
    beside = os.path.join(folder, "tokenizer.model")
    tok_path = tokenizer or (beside if os.path.isfile(beside) else None)
    return LoadedModel(config, params, g_lm, _tokenizer(tok_path), None, None, folder)
  if not paths.as_path(path).exists():
    raise FileNotFoundError(f"nothing to load at {path}: give a run directory, its "
                            "checkpoints/ directory, a Hugging Face folder or a checkpoint file")
  ckdir = checkpoints_dir(path)
  path = Path(path)
  if ckdir is not None:
    from pldr_jax.training import checkpoint as ckpt_lib
    from pldr_jax.config import DataConfig
    from pldr_jax.training.trainer import restore_for_inference
    meta = ckpt_lib.load_meta(ckdir, step)
    if "model" not in meta:
      raise CheckpointError(ckdir, f"its meta has no model config (keys: {sorted(meta)})")
    config = PLDRConfig(**meta["model"])
    if overrides:
      config = config.replace(**overrides)
    data = DataConfig(**meta["data"]) if "data" in meta else None
    if data is not None:  # recorded relative to the run directory (or by older runs)
      data = paths.resolve_data(data, ckdir.parent)
    params, g_lm, step = restore_for_inference(ckdir, config, int(meta["step"]))
    tok_path = tokenizer or (data.tokenizer_path if data is not None else None)
    if tok_path is not None and not paths.as_path(tok_path).is_file():
      tok_path = None  # the run's tokenizer was moved or deleted: load without it
    return LoadedModel(config, params, g_lm, _tokenizer(tok_path), data, step, str(ckdir))
  from pldr_jax.compat import hf
  config, params, g_lm = hf.load_checkpoint(path, **overrides)
  beside = (path if path.is_dir() else path.parent) / "tokenizer.model"
  tok_path = tokenizer or (beside if beside.is_file() else None)
  return LoadedModel(config, params, g_lm, _tokenizer(tok_path), None, None, str(path))
