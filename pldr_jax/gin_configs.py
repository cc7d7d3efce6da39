"""The gin configurables of a pretraining run, registered once per process.

`experiments/pretrain.py`, `experiments/ablate.py` and `python -m pldr_jax.aot`
read the same gin files (`experiments/configs/*.gin`): PLDRConfig.*,
TrainConfig.*, DataConfig.* and experiment.* (workdir, transferred-G source,
samples). Gin allows one registration per name and process, so they live here,
in the package, and every entry point imports them from this module.
"""

from __future__ import annotations

import gin

from pldr_jax.config import DataConfig, PLDRConfig, TrainConfig

__all__ = ["experiment", "parse", "resolve_data"]

gin.external_configurable(PLDRConfig, "PLDRConfig")
gin.external_configurable(TrainConfig, "TrainConfig")
gin.external_configurable(DataConfig, "DataConfig")


@gin.configurable
def experiment(model: PLDRConfig = gin.REQUIRED, train: TrainConfig = gin.REQUIRED,
               data: DataConfig = gin.REQUIRED, workdir: str = "runs/default",
               g_source: str | None = None, samples: int = 3, sample_tokens: int = 32,
               default_corpus_dir: str | None = None, data_workdir: str | None = None):
  """Everything a run needs; bound from gin.

  default_corpus_dir: text corpus for the local TFDS builder (None: data/corpus).
  data_workdir: where the built dataset and tokenizer are cached
  (None: <workdir>/data); runs that share it build them once.
  """
  return dict(model=model, train=train, data=data, workdir=workdir, g_source=g_source,
              samples=samples, sample_tokens=sample_tokens,
              default_corpus_dir=default_corpus_dir, data_workdir=data_workdir)


def resolve_data(run: dict) -> DataConfig:
  """The DataConfig of an `experiment()` dict; the embedded corpus and its tokenizer are
  prepared once (process 0 builds them under `data_workdir`, else <workdir>/data; the
  other processes wait for its marker file there)."""
  data = run["data"]
  if data.dataset != "pldr_text_corpus" or data.tokenizer_path is not None:
    return data
  import dataclasses

  from pldr_jax import paths
  from pldr_jax.data import prepare_default_data
  from pldr_jax.training import distributed
  fields = {f: getattr(data, f) for f in data.__dataclass_fields__
            if f not in ("dataset", "data_dir", "tokenizer_path", "vocab_size", "seq_len")}
  data_root = paths.as_path(run["data_workdir"] or paths.as_path(run["workdir"]) / "data")

  def prepare() -> dict:
    return dataclasses.asdict(prepare_default_data(
        data_root, vocab_size=data.vocab_size, seq_len=data.seq_len,
        corpus_dir=run["default_corpus_dir"], **fields))

  return DataConfig(**distributed.run_once(prepare, data_root, "prepare_data"))


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def add_search_paths() -> None:
  """Let the `include 'experiments/configs/x.gin'` lines of the shipped gin files
  resolve from any working directory (tried after the working directory)."""
  prefixes = getattr(gin.config, "_LOCATION_PREFIXES", ())  # gin has no public getter
  if str(REPO) not in prefixes:
    gin.add_config_file_search_path(str(REPO))


def parse(gin_files, gin_params=()) -> dict:
  """Parse gin files and bindings (clearing earlier ones) -> `experiment()`."""
  gin.clear_config()
  add_search_paths()
  gin.parse_config_files_and_bindings(list(gin_files), list(gin_params))
  return experiment()
