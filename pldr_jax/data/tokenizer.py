"""SentencePiece tokenizer with the PLDR-LLM conventions.

Ids 0..3 are the special pieces [PAD] [UNK] [START] [END] (as in the
published pldr-refinedweb-32k tokenizer, which also has [SEP]=4 [CLS]=5 as
user-defined symbols). Models are unigram, digits are split, unknown
characters fall back to UTF-8 byte pieces. Only [END] is used by the data
pipeline (appended after every document); [PAD] fills the unused tail of an
evaluation chunk and is ignored by the loss.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from etils import epath

from pldr_jax.data.corpus import find_split_files, iter_documents
from pldr_jax.errors import DataError

__all__ = [
    "PAD_ID", "UNK_ID", "START_ID", "END_ID", "SPECIAL_PIECES",
    "Tokenizer", "train_tokenizer", "load_tokenizer",
]

PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3
SPECIAL_PIECES = ("[PAD]", "[UNK]", "[START]", "[END]")
DEFAULT_USER_SYMBOLS = ("[SEP]", "[CLS]")
_MAX_SENTENCE_BYTES = 16384
# 4 special pieces + 256 byte-fallback pieces; the characters of the corpus
# need room on top of that.
_MIN_VOCAB = len(SPECIAL_PIECES) + 256 + 1


class Tokenizer:
  """A loaded SentencePiece model whose ids 0..3 are [PAD] [UNK] [START] [END]."""

  pad_id = PAD_ID
  unk_id = UNK_ID
  start_id = START_ID
  end_id = END_ID

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(os.fspath(path))  # local or object storage (gs://...)
    self._sp = _load_checked(self.path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def encode(self, text: str | bytes) -> list[int]:
    """Token ids of `text` (no [START]/[END] added)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return self._sp.encode(text, out_type=int)

  def encode_document(self, text: str | bytes) -> np.ndarray:
    """int32 ids of a document followed by [END]; empty for an empty document."""
    ids = self.encode(text)
    if not ids:
      return np.zeros((0,), np.int32)
    return np.asarray(ids + [END_ID], np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; [PAD] ids are dropped first."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != PAD_ID]
    return self._sp.decode(ids)

  # SentencePieceProcessor is not picklable; grain worker processes need this.
  def __getstate__(self):
    return {"path": str(self.path), "proto": self._sp.serialized_model_proto()}

  def __setstate__(self, state):
    self.path = epath.Path(state["path"])
    self._sp = spm.SentencePieceProcessor(model_proto=state["proto"])

  def __repr__(self) -> str:
    return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _load_checked(path: epath.Path) -> spm.SentencePieceProcessor:
  if not path.is_file():
    raise DataError(f"tokenizer file not found: {path} (a SentencePiece .model)")
  try:
    sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
  except (RuntimeError, OSError) as e:
    raise DataError(f"{path} is not a valid SentencePiece model: {e}") from None
  if sp.get_piece_size() <= len(SPECIAL_PIECES):
    raise DataError(f"tokenizer {path} has only {sp.get_piece_size()} pieces")
  got = tuple(sp.id_to_piece(i) for i in range(len(SPECIAL_PIECES)))
  if got != SPECIAL_PIECES:
    raise DataError(
        f"tokenizer {path} does not follow the PLDR conventions: ids 0..3 must be "
        f"{list(SPECIAL_PIECES)}, got {list(got)}. Train one with "
        "pldr_jax.data.train_tokenizer (pad_id=0 unk_id=1 bos_id=2 eos_id=3).")
  ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
  if ids != (PAD_ID, UNK_ID, START_ID, END_ID):
    raise DataError(
        f"tokenizer {path}: pad/unk/bos/eos ids are {ids}, expected (0, 1, 2, 3)")
  return sp


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads an existing `.model`, checking ids 0..3 are [PAD] [UNK] [START] [END]."""
  return Tokenizer(path)


def _documents(source, text_key: str) -> Iterator[str]:
  if isinstance(source, (str, os.PathLike)):
    path = Path(source)
    if not path.exists():
      raise DataError(f"tokenizer training corpus not found: {path}")
    splits = find_split_files(path)
    files = splits["train"] if "train" in splits else sorted(
        itertools.chain.from_iterable(splits.values()))
    yield from iter_documents(files, text_key)
    return
  for item in source:
    if isinstance(item, os.PathLike):
      if not Path(item).is_file():
        raise DataError(f"tokenizer training file not found: {item}")
      yield from iter_documents([Path(item)], text_key)
    elif isinstance(item, str):
      yield item
    elif isinstance(item, bytes):
      yield item.decode("utf-8")
    else:
      raise DataError(
          f"train_tokenizer expects texts (str) or files (pathlib.Path), got {type(item)}")


def _sentences(docs: Iterable[str]) -> Iterator[str]:
  """Lines of the documents, long lines cut at spaces to under the byte limit."""
  limit = _MAX_SENTENCE_BYTES // 4  # characters; UTF-8 uses at most 4 bytes each
  for doc in docs:
    for line in doc.splitlines():
      line = line.strip()
      while len(line) > limit:
        cut = line.rfind(" ", 0, limit)
        cut = cut if cut > 0 else limit
        yield line[:cut]
        line = line[cut:].lstrip()
      if line:
        yield line


def train_tokenizer(
    source: str | os.PathLike | Iterable[str] | Iterable[os.PathLike],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    text_key: str = "text",
    max_documents: int | None = None,
    user_defined_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 5_000_000,
    hard_vocab_limit: bool = False,
    normalization_rule_name: str = "nmt_nfkc",
    remove_extra_whitespaces: bool = True,
    num_threads: int | None = None,
    seed: int = 1234,
) -> Tokenizer:
  """Trains a unigram SentencePiece model and returns it loaded.

  Args:
    source: a corpus path (file or folder, see `corpus.py`; a folder's "train"
      split is used when it has one), or an iterable of document texts (str),
      or of files (pathlib.Path).
    vocab_size: number of pieces. With `hard_vocab_limit=False` (the default,
      as in the published tokenizer) it is an upper bound: a small corpus may
      give fewer pieces; check `Tokenizer.vocab_size`.
    model_prefix: writes `<model_prefix>.model` and `<model_prefix>.vocab`.
    max_documents: use only the first `max_documents` documents.
    normalization_rule_name, remove_extra_whitespaces: SentencePiece's
      defaults, as in the published tokenizer: NFKC, and runs of whitespace
      (newlines included) become one space, so decode(encode(text)) is the
      normalized text. Use "identity" / False to keep the text as it is.

  Conventions: split_digits, byte_fallback, [PAD]=0 [UNK]=1 [START]=2 [END]=3,
  then `user_defined_symbols` ([SEP]=4 [CLS]=5 by default).
  """
  if not isinstance(vocab_size, (int, np.integer)) or vocab_size < _MIN_VOCAB + len(user_defined_symbols):
    raise DataError(
        f"vocab_size={vocab_size!r} is too small: byte fallback needs 256 byte "
        f"pieces plus {len(SPECIAL_PIECES) + len(user_defined_symbols)} special ones "
        f"plus the corpus characters; use at least ~{_MIN_VOCAB + len(user_defined_symbols) + 100}")
  prefix = Path(model_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  docs = _documents(source, text_key)
  if max_documents is not None:
    docs = itertools.islice(docs, max_documents)
  sentences = list(_sentences(docs))
  if not sentences:
    raise DataError("train_tokenizer: the corpus has no text")
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=int(vocab_size),
        character_coverage=character_coverage,
        split_digits=True,
        byte_fallback=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=START_ID, eos_id=END_ID,
        pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[START]", eos_piece="[END]",
        user_defined_symbols=list(user_defined_symbols),
        hard_vocab_limit=hard_vocab_limit,
        normalization_rule_name=normalization_rule_name,
        remove_extra_whitespaces=remove_extra_whitespaces,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=num_threads or min(os.cpu_count() or 1, 16),
        minloglevel=2,
    )
  except RuntimeError as e:
    raise DataError(f"SentencePiece training failed (vocab_size={vocab_size}): {e}") from None
  return Tokenizer(f"{prefix}.model")
