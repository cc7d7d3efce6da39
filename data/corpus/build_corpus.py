"""Rebuilds train.jsonl / validation.jsonl from the Debian package r-cran-janeaustenr.

This script is provenance, not part of the runtime: the JSONL files it writes
are committed, and nothing reads the Debian package at run time. To re-run:

  apt-get download r-cran-janeaustenr          # 1.0.0-1 (Debian bookworm)
  dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb pkg
  python data/corpus/build_corpus.py \
      pkg/usr/lib/R/site-library/janeaustenr/data/Rdata data/corpus

The package keeps the six novels as R character vectors (one element per line
of the Project Gutenberg text) in R's lazy-load database (`Rdata.rdx` index +
`Rdata.rdb` zlib-compressed serialized objects). The small reader below
understands just the part of R's XDR serialization format those files use.

Documents are chapters. Paragraphs (blank-line separated) are kept, separated
by a blank line; the line breaks inside a paragraph become spaces, runs of
spaces become one space and the `_italic_` markup is removed. Front matter
shorter than 300 characters (title, author), "VOLUME"/"THE END"/"FINIS"
lines and the editor's "A NOTE ON THE TEXT" at the end of Northanger Abbey
are dropped. Every 20th chapter (global chapter index % 20 == 19, in the
fixed novel order below) goes to validation, the rest to train (~95/5).
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import sys
import zlib
from pathlib import Path

NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
          "northangerabbey", "persuasion")
VALIDATION_EVERY = 20


class _RReader:
  """Minimal reader of R's XDR serialization (version 2/3)."""

  def __init__(self, data: bytes):
    self.b = data
    self.p = 0
    self.refs = []

  def int(self) -> int:
    (v,) = struct.unpack(">i", self.b[self.p:self.p + 4])
    self.p += 4
    return v

  def header(self):
    if self.b[:2] != b"X\n":
      raise ValueError(f"not an XDR R serialization: {self.b[:2]!r}")
    self.p = 2
    version = self.int()
    self.int()  # writer R version
    self.int()  # minimal reader version
    if version == 3:
      n = self.int()
      self.p += n  # skip the native encoding name

  def length(self) -> int:
    n = self.int()
    if n == -1:
      hi, lo = self.int(), self.int()
      n = (hi << 32) + lo
    return n

  def item(self):
    flags = self.int()
    typ = flags & 0xFF
    has_attr = bool(flags & (1 << 9))
    has_tag = bool(flags & (1 << 10))
    levels = flags >> 12
    if typ == 254:  # NILVALUE_SXP
      return None
    if typ in (241, 242, 250, 251, 252, 253):  # environments / special values
      return ("special", typ)
    if typ == 255:  # REFSXP
      idx = flags >> 8
      if idx == 0:
        idx = self.int()
      return self.refs[idx - 1]
    if typ == 1:  # SYMSXP
      sym = ("sym", self.item())
      self.refs.append(sym)
      return sym
    if typ in (2, 3, 5, 6, 17):  # pairlist-like
      if has_attr:
        self.item()
      tag = self.item() if has_tag else None
      car = self.item()
      cdr = self.item()
      out = [(tag[1] if tag else None, car)]
      if isinstance(cdr, list):
        out += cdr
      return out
    if typ == 9:  # CHARSXP
      n = self.int()
      if n == -1:
        return None
      raw = self.b[self.p:self.p + n]
      self.p += n
      return raw.decode("latin-1" if levels & 4 else "utf-8")
    if typ in (10, 13):  # LGLSXP, INTSXP
      n = self.length()
      vals = list(struct.unpack(f">{n}i", self.b[self.p:self.p + 4 * n]))
      self.p += 4 * n
    elif typ == 14:  # REALSXP
      n = self.length()
      vals = list(struct.unpack(f">{n}d", self.b[self.p:self.p + 8 * n]))
      self.p += 8 * n
    elif typ in (16, 19):  # STRSXP, VECSXP
      vals = [self.item() for _ in range(self.length())]
    else:
      raise ValueError(f"unsupported R SEXP type {typ} at byte {self.p}")
    if has_attr:
      return ("attr", vals, dict(self.item()))
    return vals


def _unserialize(data: bytes):
  reader = _RReader(data)
  reader.header()
  return reader.item()


def load_lazy_db(prefix: str) -> dict[str, object]:
  """Reads every object of an R lazy-load database `prefix.rdx/.rdb`."""
  _, index_vals, index_attrs = _unserialize(
      gzip.decompress(Path(prefix + ".rdx").read_bytes()))
  index = dict(zip(index_attrs["names"], index_vals))
  _, offsets, var_attrs = index["variables"]
  blob = Path(prefix + ".rdb").read_bytes()
  out = {}
  for name, (offset, length) in zip(var_attrs["names"], offsets):
    rec = blob[int(offset):int(offset) + int(length)]
    out[name] = _unserialize(zlib.decompress(rec[4:]))  # 4-byte length, zlib
  return out


_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_DROP = re.compile(r"^\s*(volume\s+[ivx]+|the end|finis)\s*$", re.IGNORECASE)


def _paragraphs(lines: list[str]) -> str:
  paras, cur = [], []
  for line in lines + [""]:
    line = line.strip()
    if _DROP.match(line):
      line = ""
    if line:
      cur.append(line)
    elif cur:
      text = re.sub(r"_([^_]+)_", r"\1", " ".join(cur))
      paras.append(re.sub(r" {2,}", " ", text))
      cur = []
  return "\n\n".join(paras)


def chapters(novel: str, lines: list[str]) -> list[tuple[str, str]]:
  """Splits a novel's lines into (id, text) chapter documents."""
  docs, cur, heading = [], [], None
  if "A NOTE ON THE TEXT" in lines:  # an edition's editorial note, not Austen's
    lines = lines[:lines.index("A NOTE ON THE TEXT")]
  for line in lines:
    if _CHAPTER.match(line):
      docs.append((heading, cur))
      heading, cur = line.strip(), []
    else:
      cur.append(line)
  docs.append((heading, cur))
  out = []
  for i, (head, body) in enumerate(docs):
    text = _paragraphs(body)
    if head is None and len(text) < 300:
      continue  # title page
    out.append((f"{novel}-{i:03d}", text))
  return out


def main(prefix: str, out_dir: str):
  books = load_lazy_db(prefix)
  out = Path(out_dir)
  splits = {"train": [], "validation": []}
  k = 0
  for novel in NOVELS:
    for doc_id, text in chapters(novel, books[novel]):
      split = "validation" if k % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
      splits[split].append({"id": doc_id, "text": text})
      k += 1
  for split, docs in splits.items():
    with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
      for doc in docs:
        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    size = (out / f"{split}.jsonl").stat().st_size
    print(f"{split}: {len(docs)} documents, {size} bytes")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
