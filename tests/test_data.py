"""Data pipeline: embedded corpus, tokenizer, TFDS ArrayRecord, packing, resume."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from helpers import child_script
from pldr_jax import data as D
from pldr_jax import errors
from pldr_jax.config import LOCAL_DATASET, DataConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
N_TRAIN, N_VAL, MAX_CHARS = 10, 3, 4000


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, texts):
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A small slice of the embedded corpus, its tokenizer and TFDS dataset."""
  root = tmp_path_factory.mktemp("data")
  corpus = root / "corpus"
  corpus.mkdir()
  train = [d["text"][:MAX_CHARS] for d in _read_jsonl(CORPUS / "train.jsonl")[:N_TRAIN]]
  val = [d["text"][:MAX_CHARS] for d in _read_jsonl(CORPUS / "validation.jsonl")[:N_VAL]]
  _write_jsonl(corpus / "train.jsonl", train)
  _write_jsonl(corpus / "validation.jsonl", val)
  tok = D.train_tokenizer(corpus, 512, root / "spm" / "small")
  data_dir = root / "tfds"
  name = D.build_text_dataset(corpus, data_dir)
  cfg = DataConfig(dataset=name, data_dir=str(data_dir), tokenizer_path=str(tok.path),
                     seq_len=64, batch_size=4, seed=7, num_threads=2)
  return dict(root=root, corpus=corpus, train=train, val=val, tok=tok, cfg=cfg)


import tensorflow_datasets as tfds  # noqa: E402  (after pldr_jax.data: no TF needed)
from etils import epath  # noqa: E402


class TinyLines(tfds.core.GeneratorBasedBuilder):
  """Stands in for a registered TFDS text dataset (c4/en, lm1b): another name,
  another text feature ("content") and an extra feature."""

  VERSION = tfds.core.Version("2.0.0")
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"content": tfds.features.Text(), "idx": tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(TINY_LINES)}

  def _generate_examples(self, texts):
    for i, text in enumerate(texts):
      yield i, {"content": text, "idx": i}


TINY_LINES = [f"Line {i}: " + " ".join(["Emma", "Harriet", "Knightley"][: i % 3 + 1]) * (i + 1)
              for i in range(12)]


@pytest.fixture(scope="module")
def tiny_lines_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tiny_lines")
  TinyLines(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


# ---------------------------------------------------------------------------
# Embedded corpus


def test_embedded_corpus_is_there_and_split():
  assert D.default_corpus_dir() == CORPUS
  train, val = _read_jsonl(CORPUS / "train.jsonl"), _read_jsonl(CORPUS / "validation.jsonl")
  size = sum((CORPUS / f).stat().st_size for f in ("train.jsonl", "validation.jsonl"))
  assert 2e6 <= size <= 8e6
  assert all(isinstance(d["text"], str) and len(d["text"]) > 500 for d in train + val)
  assert 0.03 <= len(val) / (len(train) + len(val)) <= 0.07
  assert not {d["id"] for d in train} & {d["id"] for d in val}
  assert not {d["text"] for d in train} & {d["text"] for d in val}
  readme = (CORPUS / "README.md").read_text()
  assert "r-cran-janeaustenr" in readme and "public domain" in readme and "MIT" in readme


# ---------------------------------------------------------------------------
# Tokenizer


def _check_conventions(tok):
  assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[UNK]", "[START]", "[END]"]
  assert (tok.pad_id, tok.unk_id, tok.start_id, tok.end_id) == (0, 1, 2, 3)
  texts = ["It is a truth universally acknowledged, that a single man in possession",
           "Mr. Bennet paid 12,345 pounds in 1813; £ é 😀 日本語 (new paragraph)",
           ""]
  for text in texts:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 < i < tok.vocab_size for i in ids)
  # nmt_nfkc normalization, as in the published model: whitespace runs -> one space
  assert tok.decode(tok.encode("  two\n\nparagraphs  ")) == "two paragraphs"
  # split_digits: no piece holds more than one digit (a byte piece is one byte)
  assert tok.decode(tok.encode("9876543210 1813")) == "9876543210 1813"
  for i in tok.encode("In 1813, 12,345 and 2024: 9876543210."):
    piece = tok.id_to_piece(i)
    assert piece.startswith("<0x") or sum(c.isdigit() for c in piece) <= 1, piece
  # byte_fallback: a character the model has never seen becomes byte pieces, not [UNK]
  ids = tok.encode("\u16a0")  # RUNIC LETTER FEHU
  assert tok.unk_id not in ids
  assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
  # decode drops [PAD]
  assert tok.decode([0] + tok.encode("a cat") + [0, 0]) == "a cat"


def test_trained_tokenizer_conventions(small):
  tok = small["tok"]
  assert tok.vocab_size == 512
  assert [tok.id_to_piece(i) for i in (4, 5)] == ["[SEP]", "[CLS]"]
  _check_conventions(tok)
  reloaded = D.load_tokenizer(tok.path)
  assert reloaded.encode(small["train"][0]) == tok.encode(small["train"][0])
  doc = tok.encode_document("Emma Woodhouse")
  assert doc.dtype == np.int32 and doc[-1] == D.END_ID and D.END_ID not in doc[:-1]
  assert tok.encode_document("").size == 0


def test_train_tokenizer_accepts_texts(tmp_path, small):
  # Frequent multi-digit numbers would become pieces without split_digits.
  numbers = ["In 1813 and 1814, 2024 or 1234567 pounds; 1813 1813 2024."] * 300
  tok = D.train_tokenizer(small["train"][:5] + numbers, 400, tmp_path / "from_texts")
  assert (tmp_path / "from_texts.model").is_file() and tok.vocab_size <= 400
  _check_conventions(tok)
  pieces = [tok.id_to_piece(i) for i in tok.encode("1813 2024 1234567")]
  assert all(not p.startswith("<0x") for p in pieces), pieces  # digits were seen
  assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces


def test_published_tokenizer(published_data):
  path = published_data / "pldr-refinedweb-32k.model"
  if not path.is_file():
    pytest.skip(f"{path} not found")
  tok = D.load_tokenizer(path)
  assert tok.vocab_size == 32000
  _check_conventions(tok)


def test_load_tokenizer_rejects_other_conventions(tmp_path, small):
  # SentencePiece's own defaults: <unk>=0 <s>=1 </s>=2, no pad piece.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(small["train"]), model_prefix=str(tmp_path / "plain"),
      vocab_size=300, minloglevel=2)
  with pytest.raises(errors.DataError, match="ids 0..3"):
    D.load_tokenizer(tmp_path / "plain.model")
  with pytest.raises(errors.DataError, match="tokenizer"):
    D.load_tokenizer(tmp_path / "missing.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(errors.DataError, match="SentencePiece"):
    D.load_tokenizer(tmp_path / "junk.model")


# ---------------------------------------------------------------------------
# TFDS


def test_tfds_array_record_build_and_read(small):
  cfg = small["cfg"]
  files = sorted(p.name for p in (pathlib.Path(cfg.data_dir) / LOCAL_DATASET / "1.0.0").iterdir())
  assert any(".array_record-" in f and "-train." in f for f in files), files
  import tensorflow_datasets as tfds
  train = tfds.data_source(cfg.dataset, split="train", data_dir=cfg.data_dir, download=False)
  val = tfds.data_source(cfg.dataset, split="validation", data_dir=cfg.data_dir, download=False)
  assert len(train) == N_TRAIN and len(val) == N_VAL
  assert sorted(train[i]["text"].decode() for i in range(len(train))) == sorted(small["train"])
  assert sorted(val[i]["text"].decode() for i in range(len(val))) == sorted(small["val"])


@pytest.mark.slow  # a fresh interpreter
def test_tfds_build_and_read_without_tensorflow(tmp_path, small, tiny_lines_dir):
  """A fresh interpreter builds and reads the dataset without ever importing TF.

  (TensorFlow is not installed in the project's environment at all; this
  also holds where it is installed but must stay unused.)
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, child_script("tfds_without_tf"), str(small["corpus"]),
                         str(tmp_path / "tfds"), str(N_TRAIN), str(tiny_lines_dir),
                         json.dumps(TINY_LINES)],
                        capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"OK {N_TRAIN}" in proc.stdout


def test_build_is_cached_and_detects_other_corpus(tmp_path, small):
  data_dir = pathlib.Path(small["cfg"].data_dir)
  shard = next((data_dir / LOCAL_DATASET / "1.0.0").glob("*-train.array_record-*"))
  mtime = shard.stat().st_mtime_ns
  assert D.build_text_dataset(small["corpus"], data_dir) == LOCAL_DATASET
  assert shard.stat().st_mtime_ns == mtime  # reused, not rebuilt

  other = tmp_path / "other"
  other.mkdir()
  _write_jsonl(other / "train.jsonl", ["one document.", "another document."])
  copy = tmp_path / "tfds"
  D.build_text_dataset(small["corpus"], copy)
  with pytest.raises(errors.DataError, match="different"):
    D.build_text_dataset(other, copy)
  D.build_text_dataset(other, copy, overwrite=True)
  cfg = small["cfg"].replace(data_dir=str(copy))
  assert len(D.open_data_source(cfg.dataset, "train", cfg.data_dir)) == 2


def test_other_tfds_dataset_by_name_and_key(small, tiny_lines_dir):
  tok = small["tok"]
  cfg = small["cfg"].replace(dataset="tiny_lines", data_dir=str(tiny_lines_dir),
                             text_key="content", eval_split="train[:6]", seq_len=16)
  batch = next(D.make_train_iterator(cfg))
  assert batch["tokens"].shape == (cfg.batch_size, 16)
  source = D.open_data_source(cfg.dataset, cfg.eval_split, cfg.data_dir)
  flat = np.concatenate([tok.encode_document(source[i]["content"]) for i in range(6)])
  got = np.concatenate([b["tokens"].reshape(-1) for b in D.make_eval_batches(cfg)])
  np.testing.assert_array_equal(got[:flat.size], flat)
  assert {source[i]["idx"] for i in range(6)} <= set(range(len(TINY_LINES)))


# ---------------------------------------------------------------------------
# Packing


def test_pack_documents_exact():
  docs = [np.array(d, np.int32) for d in ([5, 6, 7, 3], [8, 3], [9, 10, 11, 12, 13, 3], [14, 3])]
  flat = np.concatenate(docs)  # 14 tokens
  chunks = D.pack_documents(docs, 4)
  assert [c["tokens"].tolist() for c in chunks] == [flat[0:4].tolist(), flat[4:8].tolist(),
                                                     flat[8:12].tolist()]  # tail dropped
  assert all(c["tokens"].dtype == np.int32 and c["tokens"].shape == (4,) for c in chunks)
  assert all(c["mask"].tolist() == [1, 1, 1, 1] for c in chunks)
  padded = D.pack_documents(docs, 4, pad_final=True)
  assert padded[-1]["tokens"].tolist() == [14, 3, 0, 0]
  assert padded[-1]["mask"].tolist() == [1, 1, 0, 0]
  assert len(D.pack_documents(docs, 7)) == 2 and len(D.pack_documents(docs, 7, pad_final=True)) == 2


def test_train_batches_are_packed_documents_with_end(small):
  tok = small["tok"]
  cfg = small["cfg"].replace(shuffle=False, num_epochs=1)
  from pldr_jax.data.tfds_text import open_data_source
  source = open_data_source(cfg.dataset, cfg.train_split, cfg.data_dir)
  docs = [tok.encode_document(source[i]["text"]) for i in range(len(source))]
  assert all(d[-1] == D.END_ID and D.END_ID not in d[:-1] for d in docs)
  flat = np.concatenate(docs)
  batches = list(D.make_train_iterator(cfg))
  tokens = np.stack([b["tokens"] for b in batches])
  assert tokens.dtype == np.int32 and tokens.shape[1:] == (cfg.batch_size, cfg.seq_len)
  n_chunks = len(flat) // cfg.seq_len
  assert len(batches) == n_chunks // cfg.batch_size  # partial chunk and batch dropped
  got = tokens.reshape(-1)
  np.testing.assert_array_equal(got, flat[:got.size])
  # [END] exactly after each document: its positions are the document ends.
  ends = np.cumsum([len(d) for d in docs]) - 1
  np.testing.assert_array_equal(np.flatnonzero(got == D.END_ID), ends[ends < got.size])
  assert all((b["mask"] == 1).all() for b in batches)


def test_shuffle_uses_seed(small):
  cfg = small["cfg"]
  first = lambda c: next(D.make_train_iterator(c))["tokens"]
  np.testing.assert_array_equal(first(cfg), first(cfg))
  assert not np.array_equal(first(cfg), first(cfg.replace(seed=8)))
  assert not np.array_equal(first(cfg), first(cfg.replace(shuffle=False)))


# ---------------------------------------------------------------------------
# Checkpointable iterator


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_restore_gives_identical_batches(small, num_threads):
  cfg = small["cfg"].replace(num_threads=num_threads)
  # ~13k tokens per epoch at 256 tokens per batch: 90 batches cross epoch ends.
  n = 90
  it = D.make_train_iterator(cfg)
  reference, states = [], []
  for _ in range(n):
    states.append(json.loads(json.dumps(it.get_state())))  # must be JSON-able
    reference.append(next(it))
  assert any(s["offset"] > 0 for s in states)  # resumes inside a document
  for k in (0, 1, 17, 55, 83):
    resumed = D.make_train_iterator(cfg, state=states[k])
    for j in range(k, min(k + 7, n)):
      b = next(resumed)
      np.testing.assert_array_equal(b["tokens"], reference[j]["tokens"], err_msg=f"{k} {j}")
      np.testing.assert_array_equal(b["mask"], reference[j]["mask"])
    it2 = D.make_train_iterator(cfg)
    it2.set_state(states[k])
    np.testing.assert_array_equal(next(it2)["tokens"], reference[k]["tokens"])
  # Epoch 2 is reshuffled, not a copy of epoch 1.
  tokens = np.concatenate([b["tokens"].reshape(-1) for b in reference])
  first = tokens[:2000]
  starts = np.flatnonzero(tokens[1:tokens.size - 2000] == first[0]) + 1
  assert not any(np.array_equal(first, tokens[s:s + 2000]) for s in starts)


# ---------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_cover_split_with_padding(small):
  tok = small["tok"]
  cfg = small["cfg"].replace(eval_batch_size=3)
  batches = D.make_eval_batches(cfg)
  assert batches and all(b["tokens"].shape == (3, cfg.seq_len) for b in batches)
  from pldr_jax.data.tfds_text import open_data_source
  source = open_data_source(cfg.dataset, cfg.eval_split, cfg.data_dir)
  flat = np.concatenate([tok.encode_document(source[i]["text"]) for i in range(len(source))])
  got = np.concatenate([b["tokens"].reshape(-1) for b in batches])
  mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
  np.testing.assert_array_equal(got[:flat.size], flat)
  assert (got[flat.size:] == D.PAD_ID).all() and got.size - flat.size < 3 * cfg.seq_len
  np.testing.assert_array_equal(mask, (got != D.PAD_ID).astype(np.int32))
  again = D.make_eval_batches(cfg)
  assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))
  assert len(D.make_eval_batches(cfg.replace(max_eval_batches=1))) == 1


# ---------------------------------------------------------------------------
# Errors and the default data


@pytest.mark.parametrize("field,value", [("seq_len", 1), ("seq_len", 0), ("batch_size", 0),
                                         ("num_epochs", 0), ("text_key", "")])
def test_config_errors(field, value):
  with pytest.raises(errors.DataError, match=field):
    DataConfig(**{field: value})
  with pytest.raises(errors.DataError, match="unknown"):
    DataConfig().replace(seqlen=3)


def test_missing_inputs_errors(tmp_path, small):
  with pytest.raises(errors.DataError, match="corpus"):
    D.build_text_dataset(tmp_path / "nope", tmp_path / "tfds")
  with pytest.raises(errors.DataError, match="corpus"):
    D.train_tokenizer(tmp_path / "nope", 512, tmp_path / "spm")
  with pytest.raises(errors.DataError, match="vocab_size"):
    D.train_tokenizer(small["train"], 100, tmp_path / "spm")
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.DataError, match="holds no"):
    D.build_text_dataset(tmp_path / "empty", tmp_path / "tfds")
  cfg = small["cfg"]
  with pytest.raises(errors.DataError, match="tokenizer"):
    D.make_train_iterator(cfg.replace(tokenizer_path=str(tmp_path / "x.model")))
  with pytest.raises(errors.DataError, match="tokenizer_path"):
    D.make_eval_batches(cfg.replace(tokenizer_path=None))
  with pytest.raises(errors.DataError, match="prepared"):
    D.make_train_iterator(cfg.replace(data_dir=str(tmp_path / "empty")))
  with pytest.raises(errors.DataError, match="tfds build"):
    D.open_data_source("lm1b", "train", tmp_path / "empty")
  with pytest.raises(errors.DataError, match="data_dir"):
    D.open_data_source("lm1b", "train", tmp_path / "missing")
  with pytest.raises(errors.DataError, match="text_key"):
    next(D.make_train_iterator(cfg.replace(text_key="content", num_threads=0)))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "train.jsonl").write_text('{"content": "x"}\n')
  with pytest.raises(errors.DataError, match="'text' field"):
    D.build_text_dataset(bad, tmp_path / "tfds_bad")


def test_prepare_default_data_is_cached(tmp_path):
  cfg = D.prepare_default_data(tmp_path, vocab_size=400, seq_len=32,
                               max_tokenizer_documents=4, batch_size=2)
  assert cfg.seq_len == 32 and cfg.batch_size == 2 and cfg.dataset == LOCAL_DATASET
  model = pathlib.Path(cfg.tokenizer_path)
  assert model.is_file() and model.parent.parent == tmp_path
  n_train = len(_read_jsonl(CORPUS / "train.jsonl"))
  assert len(D.open_data_source(cfg.dataset, cfg.train_split, cfg.data_dir)) == n_train
  mtime = model.stat().st_mtime_ns
  assert D.prepare_default_data(tmp_path, vocab_size=400, seq_len=32,
                                max_tokenizer_documents=4, batch_size=2) == cfg
  assert model.stat().st_mtime_ns == mtime
  batch = next(D.make_train_iterator(cfg))
  assert batch["tokens"].shape == (2, 32) and batch["tokens"].max() < 400
