"""Sanity checks for the project-written quickstart sentiment dataset."""

import csv
import string
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "latadj_jax/data/quickstart"
SPLITS = ("train", "dev")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014"})


def _read(split):
  with open(DATA_DIR / f"{split}.csv", encoding="utf-8", newline="") as f:
    return list(csv.reader(f))


def _rows(split):
  return _read(split)[1:]


def _norm(text):
  return " ".join(text.lower().translate(_PUNCT).split())


def test_files_parse_with_header():
  for split in SPLITS:
    rows = _read(split)
    assert rows[0] == ["label", "text"], split
    assert len(rows) > 1, split
    for i, row in enumerate(rows[1:], start=2):
      assert len(row) == 2, (split, i, row)


def test_labels_binary():
  for split in SPLITS:
    labels = {label for label, _ in _rows(split)}
    assert labels <= {"0", "1"}, (split, labels)
    assert labels == {"0", "1"}, (split, labels)


def test_balanced():
  for split in SPLITS:
    rows = _rows(split)
    pos = sum(1 for label, _ in rows if label == "1")
    neg = len(rows) - pos
    assert abs(pos - neg) <= 0.02 * len(rows), (split, pos, neg)


def test_no_empty_texts():
  for split in SPLITS:
    for label, text in _rows(split):
      assert text.strip(), (split, label)
      assert _norm(text), (split, text)


def test_no_duplicates_within_split():
  for split in SPLITS:
    seen = {}
    for i, (_, text) in enumerate(_rows(split)):
      key = _norm(text)
      assert key not in seen, (split, text, seen.get(key))
      seen[key] = i


def test_no_dev_train_overlap():
  train = {_norm(text) for _, text in _rows("train")}
  leaked = [text for _, text in _rows("dev") if _norm(text) in train]
  assert not leaked, leaked
