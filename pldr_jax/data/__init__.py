"""Pretraining data: embedded corpus, TFDS ArrayRecord datasets, SentencePiece
tokenizer and the grain packing pipeline. TensorFlow is not needed.

The functions of the data modules are gathered here; `DataConfig` and `LOCAL_DATASET`
live in `pldr_jax.config`, `DataError` in `pldr_jax.errors`."""

from pldr_jax.data.corpus import (DEFAULT_CORPUS_DIR, default_corpus_dir, find_split_files,
                                  iter_documents)
from pldr_jax.data.pipeline import (PackedIterDataset, make_eval_batches, make_train_dataset,
                                    make_train_iterator, pack_documents, prepare_default_data)
from pldr_jax.data.tfds_text import PldrTextCorpus, build_text_dataset, open_data_source
from pldr_jax.data.tokenizer import (END_ID, PAD_ID, SPECIAL_PIECES, START_ID, UNK_ID,
                                     Tokenizer, load_tokenizer, train_tokenizer)

__all__ = [
    "DEFAULT_CORPUS_DIR", "default_corpus_dir", "find_split_files", "iter_documents",
    "PackedIterDataset", "make_eval_batches", "make_train_dataset", "make_train_iterator",
    "pack_documents", "prepare_default_data", "PldrTextCorpus", "build_text_dataset",
    "open_data_source", "END_ID", "PAD_ID", "SPECIAL_PIECES", "START_ID", "UNK_ID",
    "Tokenizer", "load_tokenizer", "train_tokenizer",
]
