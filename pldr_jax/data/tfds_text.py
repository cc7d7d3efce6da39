"""TFDS access: a local text/JSONL dataset builder and random-access sources.

`PldrTextCorpus` is a TFDS `GeneratorBasedBuilder` (registered name
"pldr_text_corpus") that turns a corpus folder (see `corpus.py`) into an
ArrayRecord TFDS dataset with one feature, "text". Writing ArrayRecord needs no
TensorFlow: TFDS serializes with its own protobuf copies and writes through
`array_record`.

Every dataset, this one or any registered TFDS text dataset ("c4/en", "lm1b",
...), is then read the same way: `tfds.data_source(name, split=...,
data_dir=...)`, which gives a random-access sequence of dicts
{feature: value} that grain samples from. Registered datasets must have been
prepared in ArrayRecord format beforehand, e.g.
`tfds build c4/en --file_format=array_record --data_dir=DIR`; nothing is
downloaded at run time unless asked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from pldr_jax import paths
from pldr_jax.config import LOCAL_DATASET
from pldr_jax.data.corpus import corpus_fingerprint, find_split_files, iter_documents
from pldr_jax.errors import DataError

__all__ = ["PldrTextCorpus", "build_text_dataset", "open_data_source"]

_SOURCE_FILE = "pldr_source.json"


class PldrTextCorpus(tfds.core.GeneratorBasedBuilder):
  """Local plain-text / JSONL corpus as a TFDS dataset of {"text": str}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # TFDS 4.9.x works out a builder's source file through the
  # `importlib_resources` backport, which it only declares for Python < 3.9;
  # naming the file here keeps download_and_prepare working without it.
  code_path = epath.Path(__file__)

  def __init__(self, *, corpus_dir: str | os.PathLike | None = None,
               text_key: str = "text", **kwargs):
    self._corpus_dir = Path(corpus_dir) if corpus_dir is not None else None
    self._text_key = text_key
    super().__init__(**kwargs)

  # Nothing is downloaded: no "Downloading and preparing dataset Unknown size ..." banner.
  def _log_download_bytes(self) -> None:
    print(f"building the TFDS dataset of {self._corpus_dir} in {self.data_dir} (once)",
          flush=True)

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents of a local plain-text / JSONL corpus (pldr-jax).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if self._corpus_dir is None:
      raise DataError(
          f"{LOCAL_DATASET} is not prepared under {self.data_dir}; build it with "
          "pldr_jax.data.build_text_dataset(corpus_dir, data_dir)")
    return {split: self._generate_examples(files)
            for split, files in find_split_files(self._corpus_dir).items()}

  def _generate_examples(self, files: Sequence[Path]):
    for i, path in enumerate(files):
      for j, text in enumerate(iter_documents([path], self._text_key)):
        yield f"{i:05d}-{j:09d}", {"text": text}


def _dataset_root(data_dir: Path) -> Path:
  return data_dir / LOCAL_DATASET


def build_text_dataset(corpus_dir: str | os.PathLike, data_dir: str | os.PathLike,
                       *, text_key: str = "text", overwrite: bool = False) -> str:
  """Builds (or reuses) the ArrayRecord TFDS dataset of a local corpus.

  Args:
    corpus_dir: folder with e.g. train.jsonl / validation.jsonl (see corpus.py).
    data_dir: TFDS data_dir; the dataset goes to
      `<data_dir>/pldr_text_corpus/1.0.0/`.
    text_key: the JSON field that holds a document's text.
    overwrite: rebuild even if a dataset built from other files is there.

  Returns:
    The TFDS name to pass to `tfds.data_source` ("pldr_text_corpus").

  A second call with the same corpus reuses the prepared files (a fingerprint
  of the corpus files is kept next to them); a different corpus in the same
  data_dir raises unless `overwrite=True`.
  """
  splits = find_split_files(corpus_dir)  # raises DataError if missing
  with _quiet_tfds():
    return _build(corpus_dir, Path(data_dir), splits, text_key, overwrite)


@contextlib.contextmanager
def _quiet_tfds():
  """No TFDS progress bars or absl warnings about half-built folders while a local corpus
  is built (seconds, nothing downloaded); both as they were afterwards."""
  from tensorflow_datasets.core.utils import tqdm_utils
  was_active = getattr(tqdm_utils, "_active", True)
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  tfds.display_progress_bar(False)
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_active)
    absl_log.setLevel(level)


def _build(corpus_dir, data_dir: Path, splits, text_key: str, overwrite: bool) -> str:
  """build_text_dataset, once the corpus files are found."""
  fingerprint = corpus_fingerprint(splits, text_key)
  root = _dataset_root(data_dir)
  source_file = root / _SOURCE_FILE
  builder = PldrTextCorpus(corpus_dir=corpus_dir, text_key=text_key,
                           data_dir=str(data_dir), file_format="array_record")
  if builder.is_prepared():
    try:
      old = json.loads(source_file.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
      old = None
    if old == fingerprint:
      return LOCAL_DATASET
    if not overwrite:
      raise DataError(
          f"{root} already holds a {LOCAL_DATASET} dataset built from different "
          f"files than {corpus_dir}; use another data_dir or overwrite=True")
    shutil.rmtree(root)
    builder = PldrTextCorpus(corpus_dir=corpus_dir, text_key=text_key,
                             data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  source_file.write_text(json.dumps(
      {"corpus_dir": str(Path(corpus_dir).resolve()), "text_key": text_key,
       "fingerprint": fingerprint}, indent=1))
  return LOCAL_DATASET


def local_copy(name: str, split: str, data_dir: str) -> str:
  """A local data_dir holding the files of `split` of dataset `name` from the
  object-storage `data_dir` (array_record reads local files only). Copied once
  into the local cache (`pldr_jax.paths.cache_dir`); files already there with
  the same size are kept."""
  folder = name.split(":")[0]  # 'c4/en:3.1.0' -> c4/en/<version>/...
  split_name = split.split("[")[0]

  def keep(rel: str) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return base.endswith(".json") or f"-{split_name}." in base

  local = paths.cache_dir(data_dir)
  paths.sync_tree(paths.as_path(data_dir) / folder, local / folder, keep)
  return os.fspath(local)


def open_data_source(name: str, split: str, data_dir: str | os.PathLike | None,
                     *, download: bool = False) -> Any:
  """`tfds.data_source(name, split=split, data_dir=data_dir)` with clear errors.

  Returns a random-access sequence (len, [i]) of feature dicts. A data_dir on
  object storage (`gs://...`) is read through a local copy of the split's files
  (`local_copy`).
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  if data_dir is not None and not paths.as_path(data_dir).exists():
    raise DataError(f"TFDS data_dir not found: {data_dir}")
  if data_dir is not None and paths.is_remote(data_dir):
    data_dir = local_copy(name, split, data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except DataError:
    raise
  except Exception as e:  # TFDS raises many types; say what to do
    hint = (
        "build it with pldr_jax.data.build_text_dataset(corpus_dir, data_dir) or "
        "prepare_default_data(work_dir, ...)" if name.split("/")[0].split(":")[0]
        == LOCAL_DATASET else
        f"prepare it first in ArrayRecord format, e.g. `tfds build {name} "
        f"--file_format=array_record --data_dir={data_dir or '~/tensorflow_datasets'}`")
    raise DataError(
        f"cannot open TFDS dataset {name!r} split {split!r} in data_dir "
        f"{data_dir!r}: {type(e).__name__}: {e}\nIf it is not prepared yet, {hint}."
    ) from e
