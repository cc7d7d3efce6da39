"""grain input pipeline: TFDS documents -> tokens -> packed chunks -> batches.

Training (`make_train_iterator`):

  tfds.data_source(dataset, split=train_split, data_dir=...)    random access
    -> grain.MapDataset.source           (optionally sharded per host)
    -> .shuffle(seed)                    document order; reshuffled each epoch
    -> .repeat(num_epochs)               None = forever
    -> .map(tokenize)                    ids of the text + [END] (=3)
    -> .to_iter_dataset(ReadOptions)     threads tokenize ahead
    -> PackedIterDataset(seq_len)        concatenate, cut every seq_len tokens
    -> .batch(batch_size, drop_remainder=True)

Each element is {"tokens": int32 [B, seq_len], "mask": int32 [B, seq_len]};
mask is 0 exactly where tokens == [PAD] (=0). Training chunks are fully packed
(no padding): documents run across chunk borders, [END] closes each document.
When `num_epochs` is finite the last partial chunk and partial batch are
DROPPED. The loss is next-token prediction on tokens[:, 1:] from
tokens[:, :-1], weighted by mask[:, 1:].

Evaluation (`make_eval_batches`) packs the eval split in file order, without
shuffling; its final partial chunk is PADDED with [PAD] (mask 0) and its final
partial batch is filled with all-[PAD] rows, so every batch has the same shape.

Checkpointing: the train iterator is a `grain.DatasetIterator`;
`it.get_state()` is a small JSON-serializable dict and `it.set_state(state)`
on a fresh iterator of the same config resumes so the following batches are
exactly those the uninterrupted iterator would have produced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from pldr_jax import paths
from pldr_jax.config import DataConfig
from pldr_jax.data.corpus import corpus_fingerprint, default_corpus_dir, find_split_files
from pldr_jax.data.tfds_text import build_text_dataset, open_data_source
from pldr_jax.data.tokenizer import (PAD_ID, Tokenizer, load_tokenizer,
                                     train_tokenizer)
from pldr_jax.errors import DataError

__all__ = [
    "PackedIterDataset", "make_train_dataset", "make_train_iterator",
    "make_eval_batches", "prepare_default_data", "pack_documents",
]


# ----------------------------------------------------------------------------
# Packing


def _chunk(tokens: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": tokens, "mask": (tokens != PAD_ID).astype(np.int32)}


class _PackedIterator(grain.DatasetIterator):
  """Concatenates token arrays and cuts them into seq_len chunks.

  State: the parent's state before the document being consumed, and how many
  of that document's tokens were already emitted. Restoring re-reads that one
  document and skips the emitted tokens.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_final: bool):
    super().__init__(parent)
    self._docs = parent
    self._seq_len = seq_len
    self._pad_final = pad_final
    self._doc: np.ndarray | None = None
    self._doc_state: Any = None
    self._offset = 0
    self._exhausted = False

  def _next_doc(self) -> bool:
    state = self._docs.get_state()
    try:
      doc = next(self._docs)
    except StopIteration:
      self._exhausted = True
      self._doc = None
      return False
    self._doc, self._doc_state, self._offset = np.asarray(doc, np.int32), state, 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    if self._exhausted:
      raise StopIteration
    pieces, need = [], self._seq_len
    while need:
      if self._doc is None or self._offset >= len(self._doc):
        if not self._next_doc():
          if pieces and self._pad_final:
            pieces.append(np.full((need,), PAD_ID, np.int32))
            return _chunk(np.concatenate(pieces))
          raise StopIteration
        continue
      piece = self._doc[self._offset:self._offset + need]
      pieces.append(piece)
      self._offset += len(piece)
      need -= len(piece)
    return _chunk(np.concatenate(pieces))

  def get_state(self) -> dict[str, Any]:
    if self._doc is not None and self._offset < len(self._doc):
      return {"parent": self._doc_state, "offset": int(self._offset)}
    return {"parent": self._docs.get_state(), "offset": 0}

  def set_state(self, state: dict[str, Any]):
    self._docs.set_state(state["parent"])
    self._doc, self._doc_state, self._offset = None, None, 0
    self._exhausted = False
    if state["offset"]:
      if not self._next_doc():
        raise DataError("iterator state points past the end of the data")
      if state["offset"] > len(self._doc):
        raise DataError(
            "iterator state does not match the data: offset "
            f"{state['offset']} > document length {len(self._doc)}")
      self._offset = int(state["offset"])


class PackedIterDataset(grain.IterDataset):
  """grain IterDataset of {"tokens", "mask"} chunks packed from token arrays."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, *, pad_final: bool = False):
    super().__init__(parent)
    if seq_len < 1:
      raise DataError(f"seq_len must be >= 1, got {seq_len}")
    self._docs_ds = parent
    self._seq_len = seq_len
    self._pad_final = pad_final

  def __iter__(self) -> _PackedIterator:
    return _PackedIterator(iter(self._docs_ds), self._seq_len, self._pad_final)

  def __str__(self) -> str:
    return f"PackedIterDataset(seq_len={self._seq_len}, pad_final={self._pad_final})"


def pack_documents(token_docs, seq_len: int, *, pad_final: bool = False) -> list[dict]:
  """Packs a list of token arrays (each already ending in [END]); for tests/tools."""
  ds = grain.MapDataset.source(list(token_docs)).to_iter_dataset()
  return list(PackedIterDataset(ds, seq_len, pad_final=pad_final))


# ----------------------------------------------------------------------------
# Sources


class _TokenizeDoc:
  """Feature dict -> int32 ids of its text followed by [END]."""

  def __init__(self, tokenizer: Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def __call__(self, features) -> np.ndarray:
    if isinstance(features, dict):
      if self._text_key not in features:
        raise DataError(
            f"text feature {self._text_key!r} not in dataset features "
            f"{sorted(features)}; set DataConfig.text_key")
      text = features[self._text_key]
    else:
      text = features
    if isinstance(text, np.ndarray):
      text = text.item()
    return self._tokenizer.encode_document(text)


def _tokenizer_for(cfg: DataConfig, tokenizer: Tokenizer | None) -> Tokenizer:
  if tokenizer is not None:
    return tokenizer
  if cfg.tokenizer_path is None:
    raise DataError("DataConfig.tokenizer_path is not set (and no tokenizer was given)")
  return load_tokenizer(cfg.tokenizer_path)


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.num_threads,
                           prefetch_buffer_size=cfg.prefetch_buffer_size)


def _documents(cfg: DataConfig, split: str, shard_index: int, shard_count: int
               ) -> grain.MapDataset:
  if not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  source = open_data_source(cfg.dataset, split, cfg.data_dir, download=cfg.download)
  if len(source) == 0:
    raise DataError(f"split {split!r} of {cfg.dataset!r} is empty")
  ds = grain.MapDataset.source(source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  return ds


def make_train_dataset(cfg: DataConfig, tokenizer: Tokenizer | None = None, *,
                       shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """The training pipeline as a grain IterDataset of batches (see module doc)."""
  tok = _tokenizer_for(cfg, tokenizer)
  ds = _documents(cfg, cfg.train_split, shard_index, shard_count)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  ds = ds.map(_TokenizeDoc(tok, cfg.text_key))
  it_ds = ds.to_iter_dataset(_read_options(cfg))
  it_ds = PackedIterDataset(it_ds, cfg.seq_len, pad_final=False)
  return it_ds.batch(cfg.batch_size, drop_remainder=True)


def make_train_iterator(cfg: DataConfig, tokenizer: Tokenizer | None = None, *,
                        shard_index: int = 0, shard_count: int = 1,
                        state: dict | None = None) -> grain.DatasetIterator:
  """Checkpointable iterator over training batches.

  Args:
    cfg: the data config.
    tokenizer: a loaded tokenizer; default: `load_tokenizer(cfg.tokenizer_path)`.
    shard_index / shard_count: this host's share of the documents
      (e.g. jax.process_index(), jax.process_count()).
    state: a dict from a previous `iterator.get_state()` to resume from.

  Yields {"tokens": int32 [batch_size, seq_len], "mask": int32 [batch_size, seq_len]}.
  """
  it = iter(make_train_dataset(cfg, tokenizer, shard_index=shard_index,
                               shard_count=shard_count))
  if state is not None:
    it.set_state(state)
  return it


def make_eval_batches(cfg: DataConfig, tokenizer: Tokenizer | None = None, *,
                      shard_index: int = 0, shard_count: int = 1
                      ) -> list[dict[str, np.ndarray]]:
  """Fixed evaluation batches of the eval split (unshuffled, padded; see module doc).

  At most `cfg.max_eval_batches` batches of shape [eval_batch_size, seq_len].
  Rows that are pure padding have mask 0 everywhere.
  """
  tok = _tokenizer_for(cfg, tokenizer)
  ds = _documents(cfg, cfg.eval_split, shard_index, shard_count)
  ds = ds.map(_TokenizeDoc(tok, cfg.text_key))
  chunks = iter(PackedIterDataset(ds.to_iter_dataset(_read_options(cfg)),
                                  cfg.seq_len, pad_final=True))
  batch_size = cfg.eval_batch_size or cfg.batch_size
  batches = []
  while cfg.max_eval_batches is None or len(batches) < cfg.max_eval_batches:
    rows = [c["tokens"] for _, c in zip(range(batch_size), chunks)]
    if not rows:
      break
    tokens = np.full((batch_size, cfg.seq_len), PAD_ID, np.int32)
    tokens[:len(rows)] = np.stack(rows)
    batches.append(_chunk(tokens))
    if len(rows) < batch_size:
      break
  return batches


# ----------------------------------------------------------------------------
# Default data


def prepare_default_data(work_dir: str | os.PathLike, vocab_size: int = 8000,
                         seq_len: int = 1024, *, corpus_dir: str | os.PathLike | None = None,
                         max_tokenizer_documents: int | None = None,
                         **overrides) -> DataConfig:
  """Builds the TFDS dataset of the embedded corpus and its tokenizer; cached.

  Writes `<work_dir>/tfds/pldr_text_corpus/1.0.0/*.array_record*` and
  `<work_dir>/tokenizer/spm_unigram_<vocab_size>_<corpus hash>.model` (trained
  on the train split). A second call reuses both. Returns a DataConfig pointing at them;
  `overrides` set other DataConfig fields (batch_size, seed, ...).

  work_dir may be on object storage (`gs://...`): the files are built in the
  local cache (`pldr_jax.paths.cache_dir`), then copied there.
  """
  if paths.is_remote(work_dir):
    local = prepare_default_data(paths.cache_dir(work_dir), vocab_size, seq_len,
                                 corpus_dir=corpus_dir,
                                 max_tokenizer_documents=max_tokenizer_documents, **overrides)
    remote = paths.as_path(work_dir)
    paths.sync_tree(local.data_dir, remote / "tfds")
    tok = paths.as_path(local.tokenizer_path)
    paths.sync_tree(tok.parent, remote / "tokenizer")
    return local.replace(data_dir=os.fspath(remote / "tfds"),
                         tokenizer_path=os.fspath(remote / "tokenizer" / tok.name))
  work_dir = Path(work_dir)
  corpus = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
  data_dir = work_dir / "tfds"
  name = build_text_dataset(corpus, data_dir)
  # The file name carries the corpus fingerprint: another corpus, another model.
  fingerprint = corpus_fingerprint(find_split_files(corpus), "text")[:10]
  tag = "" if max_tokenizer_documents is None else f"_docs{max_tokenizer_documents}"
  prefix = work_dir / "tokenizer" / f"spm_unigram_{vocab_size}{tag}_{fingerprint}"
  model = Path(f"{prefix}.model")
  if model.is_file():
    load_tokenizer(model)  # validates
  else:
    train_tokenizer(corpus, vocab_size, prefix, max_documents=max_tokenizer_documents)
  return DataConfig(dataset=name, data_dir=str(data_dir), tokenizer_path=str(model),
                    vocab_size=vocab_size, seq_len=seq_len, **overrides)
