"""Child of tests/test_data.py: a fresh interpreter builds and reads a TFDS dataset
without ever importing TensorFlow, and reads a dataset whose builder class is not
importable here (as for c4/en prepared elsewhere) from its files, the same call.

argv: corpus folder, data folder to build into, expected number of training records,
the tiny_lines data folder, a JSON list of tiny_lines' texts.
Prints `OK <records>`.
"""

import json
import sys

from pldr_jax import data as D
import tensorflow_datasets as tfds  # after pldr_jax.data, as tests/test_data.py

corpus, data_dir, n_train, tiny_lines_dir, tiny_lines = sys.argv[1:6]


def no_tensorflow():
  assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"], "TF imported"


name = D.build_text_dataset(corpus, data_dir)
ds = tfds.data_source(name, split="train", data_dir=data_dir, download=False)
assert len(ds) == int(n_train), len(ds)
texts = [ds[i]["text"] for i in range(len(ds))]
assert all(isinstance(t, bytes) and t for t in texts)
no_tensorflow()
print("OK", len(ds))
other = tfds.data_source("tiny_lines", split="train", data_dir=tiny_lines_dir, download=False)
assert sorted(other[i]["content"].decode() for i in range(len(other))) == sorted(
    json.loads(tiny_lines))
no_tensorflow()
