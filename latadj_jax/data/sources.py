"""Task specs and raw-example readers: local GLUE (TSV or HF parquet), CSV/JSONL, the HF hub, TFDS."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from latadj_jax.runtime import hub

HUB_GLUE = "nyu-mll/glue"
FIX_FLAGS = ("--config.data_dir=DIR (a local GLUE directory in the original TSV layout or the HF "
             "parquet layout, or a CSV/JSONL file for text_classification) with "
             "--config.data_source=local, or --config.data_source=tfds")


class DataUnavailableError(hub.Unavailable):
  """The requested data could not be read; the message says what was tried and how to fix it."""


class HubDataError(DataUnavailableError, hub.HubError):
  """A hub dataset could not be loaded now (offline, no answer, a failed download)."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  text_keys: tuple[str, ...]
  num_labels: int
  is_regression: bool
  metrics: tuple[str, ...]
  main_metric: str
  eval_split: str = "validation"


def _spec(name, text_keys, num_labels=2, metrics=("accuracy",), eval_split="validation") -> TaskSpec:
  is_regression = num_labels == 1
  return TaskSpec(name, text_keys, num_labels, is_regression, metrics, metrics[0], eval_split)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _spec("cola", ("sentence",), metrics=("mcc",)),
    _spec("sst2", ("sentence",)),
    _spec("mrpc", ("sentence1", "sentence2"), metrics=("accuracy", "f1")),
    _spec("qqp", ("question1", "question2"), metrics=("accuracy", "f1")),
    _spec("stsb", ("sentence1", "sentence2"), num_labels=1, metrics=("pearson", "spearman")),
    _spec("qnli", ("question", "sentence")),
    _spec("rte", ("sentence1", "sentence2")),
    _spec("mnli", ("premise", "hypothesis"), num_labels=3, eval_split="validation_matched"),
    _spec("wnli", ("sentence1", "sentence2")),
    _spec("text_classification", ("text",)),
)}
GLUE_TASKS = tuple(t for t in TASKS if t != "text_classification")


def get_task(name: str, **overrides: Any) -> TaskSpec:
  """Returns the spec of task ``name``, with fields replaced by ``overrides`` (e.g. num_labels=5)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  spec = TASKS[name]
  if "num_labels" in overrides and "is_regression" not in overrides:
    overrides["is_regression"] = overrides["num_labels"] == 1
  return dataclasses.replace(spec, **overrides)


@dataclasses.dataclass
class Examples:
  """Raw examples: one list of strings per text column, and the labels (-1 where unlabeled)."""
  texts: tuple[list[str], ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, rows: Sequence[int] | np.ndarray) -> "Examples":
    """Returns the examples at ``rows``, in that order."""
    rows = np.asarray(rows, dtype=np.int64)
    return Examples(tuple([col[i] for i in rows] for col in self.texts), self.labels[rows])


def _labels(values: Sequence[Any], task: TaskSpec) -> np.ndarray:
  return np.asarray(values, dtype=np.float32 if task.is_regression else np.int64)


# --- original GLUE TSV layout ----------------------------------------------------------------
# Per task: (text columns, label column, label map). Headerless CoLA uses column numbers.
_ENTAIL2 = {"entailment": 0, "not_entailment": 1}
_TSV: dict[str, tuple[tuple[Any, ...], Any, dict[str, int] | None]] = {
    "cola": ((3,), 1, None),
    "sst2": (("sentence",), "label", None),
    "mrpc": (("#1 String", "#2 String"), "Quality", None),
    "qqp": (("question1", "question2"), "is_duplicate", None),
    "stsb": (("sentence1", "sentence2"), "score", None),
    "qnli": (("question", "sentence"), "label", _ENTAIL2),
    "rte": (("sentence1", "sentence2"), "label", _ENTAIL2),
    "mnli": (("sentence1", "sentence2"), "gold_label", {"entailment": 0, "neutral": 1, "contradiction": 2}),
    "wnli": (("sentence1", "sentence2"), "label", None),
}
# Directory names of the original GLUE download, so DIR may be the GLUE root.
_GLUE_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B",
              "qnli": "QNLI", "rte": "RTE", "mnli": "MNLI", "wnli": "WNLI"}


def read_glue_tsv(path: Path, task: TaskSpec) -> Examples:
  """Returns the examples of one original-layout GLUE TSV file (labels -1 if it has none)."""
  text_cols, label_col, label_map = _TSV[task.name]
  csv.field_size_limit(sys.maxsize)
  # GLUE TSVs hold stray quotes, so quoting must be off; MRPC starts with a BOM.
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if isinstance(label_col, int):
    header, width = None, None
    text_idx, label_idx = text_cols, label_col
  else:
    header, rows = rows[0], rows[1:]
    width = len(header)
    missing = [c for c in text_cols if c not in header]
    if missing:
      raise ValueError(f"{path}: columns {missing} not in header {header}; is this the {task.name} file?")
    text_idx = tuple(header.index(c) for c in text_cols)
    label_idx = header.index(label_col) if label_col in header else None  # test files: no label
  texts: tuple[list[str], ...] = tuple([] for _ in text_idx)
  labels: list[Any] = []
  for row in rows:
    if not row or (width is not None and len(row) != width):
      continue  # a few QQP rows are malformed; the HF glue builder drops them too
    for col, i in zip(texts, text_idx):
      col.append(row[i])
    if label_idx is None:
      labels.append(-1)
    else:
      raw = row[label_idx]
      labels.append(label_map[raw] if label_map else (float(raw) if task.is_regression else int(raw)))
  return Examples(texts, _labels(labels, task))


# --- HF parquet layout -----------------------------------------------------------------------
def read_parquet(paths: Sequence[Path], task: TaskSpec) -> Examples:
  """Returns the examples of HF-layout parquet shards, concatenated in order."""
  import pandas as pd
  df = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
  keys = task.text_keys
  if task.name == "text_classification" or not all(k in df.columns for k in keys):
    keys = _fallback_keys(df.columns, task, paths[0])
  texts = tuple(df[k].astype(str).tolist() for k in keys)
  labels = df["label"].to_numpy() if "label" in df.columns else np.full(len(df), -1)
  return Examples(texts, _labels(labels, task))


def _fallback_keys(columns, task: TaskSpec, path: Path) -> tuple[str, ...]:
  # TFDS-style GLUE exports and generic datasets name the text column differently.
  for keys in (task.text_keys, ("text",), ("sentence",), ("sentence1", "sentence2")):
    if all(k in columns for k in keys):
      return keys
  raise ValueError(f"{path}: no text columns {task.text_keys} among {list(columns)}")


# --- generic CSV / JSONL (text_classification) -----------------------------------------------
def _read_table(path: Path) -> tuple[list[str], list[str]]:
  """Returns (texts, raw labels) of a `label,text` CSV (header optional) or a JSONL file."""
  if path.suffix == ".jsonl":
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return [str(r["text"]) for r in rows], [str(r["label"]) for r in rows]
  csv.field_size_limit(sys.maxsize)
  with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: the polarity CSVs start with a BOM
    rows = [r for r in csv.reader(f) if r]
  if rows and [c.strip().lower() for c in rows[0]] in (["label", "text"], ["text", "label"]):
    header, rows = [c.strip().lower() for c in rows[0]], rows[1:]
  else:
    header = ["label", "text"]
  li, ti = header.index("label"), header.index("text")
  return [r[ti] for r in rows], [r[li].strip() for r in rows]


def label_vocab(raw: Sequence[str]) -> dict[str, int]:
  """Returns the map of sorted unique labels to 0..n-1 (numerically sorted when all numeric)."""
  values = sorted(set(raw))
  try:
    values = sorted(values, key=float)  # so -1 -> 0 and 1 -> 1, and "10" sorts after "9"
  except ValueError:
    pass
  return {v: i for i, v in enumerate(values)}


def _table_examples(texts: list[str], raw: list[str], vocab: dict[str, int], task: TaskSpec,
                    where: str) -> Examples:
  if len(vocab) > task.num_labels:
    raise ValueError(f"{where} has {len(vocab)} labels {sorted(vocab, key=vocab.get)} but the task "
                     f"has {task.num_labels}; set --config.num_labels={len(vocab)}")
  return Examples((texts,), _labels([vocab[r] for r in raw], task))


def split_rows(n: int, seed: int, dev_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Returns (train rows, validation rows) of a single file, each in a seeded random order."""
  n_dev = min(n - 1, max(1, round(n * dev_fraction)))
  # Shuffled, not file order: files are often sorted by label, and max_examples takes a prefix.
  perm = np.random.default_rng(seed).permutation(n)
  return perm[n_dev:], perm[:n_dev]


# --- locating local files --------------------------------------------------------------------
def _split_names(task: TaskSpec, split: str) -> tuple[str, ...]:
  if split == "train":
    return ("train",)
  if split in ("validation", "dev", task.eval_split):
    return (task.eval_split, "validation", "dev")
  return (split,)


def _tsv_names(task: TaskSpec, split: str) -> tuple[str, ...]:
  if split == "train":
    return ("train.tsv",)
  if split in ("validation", "dev", task.eval_split):
    return ("dev_matched.tsv",) if task.name == "mnli" else ("dev.tsv",)
  return (f"{split}.tsv",)


def _load_local(task: TaskSpec, split: str, data_dir: str, seed: int, dev_fraction: float) -> Examples:
  root = Path(data_dir).expanduser()
  if not root.exists():
    raise DataUnavailableError(f"data_dir {root} does not exist. Pass an existing path: {FIX_FLAGS}.")
  looked: list[str] = []
  if root.is_file():
    return _load_single_file(task, split, root, seed, dev_fraction)
  # A task's own subdirectory wins, so DIR may be a root holding several tasks.
  dirs = [root / task.name] + ([root / _GLUE_DIRS[task.name]] if task.name in _GLUE_DIRS else []) + [root]
  for d in dirs:
    for name in _split_names(task, split):
      exact, shards = d / f"{name}.parquet", sorted(d.glob(f"{name}-*.parquet"))
      looked.append(str(exact))
      if exact.exists() or shards:
        return read_parquet([exact] if exact.exists() else shards, task)
      if task.name == "text_classification":
        for ext in (".csv", ".jsonl"):
          looked.append(str(d / f"{name}{ext}"))
          if (d / f"{name}{ext}").exists():
            return _load_table_split(task, d, d / f"{name}{ext}")
    if task.name in _TSV:
      for name in _tsv_names(task, split):
        looked.append(str(d / name))
        if (d / name).exists():
          return read_glue_tsv(d / name, task)
  raise DataUnavailableError(
      f"no {task.name} {split!r} split under {root}: looked for {', '.join(looked)}. "
      f"Point to a directory holding one of these files: {FIX_FLAGS}.")


def _load_table_split(task: TaskSpec, d: Path, path: Path) -> Examples:
  # The label map spans every split file, so train and validation agree on it.
  siblings = [d / f"{n}{e}" for n in ("train", "validation", "dev") for e in (".csv", ".jsonl")]
  raw_all = [r for p in siblings if p.exists() for r in _read_table(p)[1]]
  texts, raw = _read_table(path)
  return _table_examples(texts, raw, label_vocab(raw_all), task, str(d))


def _load_single_file(task: TaskSpec, split: str, path: Path, seed: int, dev_fraction: float) -> Examples:
  if path.suffix == ".parquet":
    ex = read_parquet([path], task)
  else:
    texts, raw = _read_table(path)
    ex = _table_examples(texts, raw, label_vocab(raw), task, str(path))
  train_rows, dev_rows = split_rows(len(ex), seed, dev_fraction)
  return ex.take(train_rows if split == "train" else dev_rows)


# --- remote sources --------------------------------------------------------------------------
def _load_hub(task: TaskSpec, split: str, hub_dataset: str) -> Examples:
  glue = task.name in GLUE_TASKS and not hub_dataset
  name = HUB_GLUE if glue else hub_dataset
  if not name:
    raise DataUnavailableError(f"task {task.name} has no hub dataset; set --config.hub_dataset=NAME "
                               f"or read local files: {FIX_FLAGS}.")
  what = f"the HF hub dataset {name}" + (f" ({task.name})" if glue else "")
  fix = f"Download it elsewhere and pass {FIX_FLAGS}."
  problem = hub.dataset_problem(name)  # bounded: datasets' own retries are not
  if problem:
    raise HubDataError(f"tried to load {what}, but {problem}. {fix}")
  try:
    import datasets
    dd = datasets.load_dataset(name, task.name if glue else None)
    names = [n for n in _split_names(task, split) + (("test",) if split != "train" else ()) if n in dd]
    if not names:
      raise KeyError(f"no split {split!r} among {list(dd)}")
    df = dd[names[0]].to_pandas()
  except Exception as e:  # any datasets/network failure becomes one actionable message
    raise HubDataError(f"tried to load {what} split {split!r} and failed "
                       f"({type(e).__name__}: {e}). {fix}") from e
  keys = task.text_keys if glue else _fallback_keys(df.columns, task, Path(name))
  return Examples(tuple(df[k].astype(str).tolist() for k in keys), _labels(df["label"].to_numpy(), task))


def _load_tfds(task: TaskSpec, split: str, hub_dataset: str) -> Examples:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataUnavailableError("tried --config.data_source=tfds, but tensorflow_datasets is not "
                               "installed: pip install 'latadj-jax[tfds]', or pass "
                               f"{FIX_FLAGS}.") from e
  name = f"glue/{task.name}" if task.name in GLUE_TASKS else hub_dataset
  tf_split = "train" if split == "train" else task.eval_split
  try:
    data = tfds.as_numpy(tfds.load(name, split=tf_split, batch_size=-1))
  except Exception as e:
    raise DataUnavailableError(f"tried to load TFDS {name} split {tf_split!r} and failed "
                               f"({type(e).__name__}: {e}). Pass {FIX_FLAGS}.") from e
  keys = task.text_keys if all(k in data for k in task.text_keys) else _fallback_keys(data, task, Path(name))
  texts = tuple([t.decode("utf-8") for t in data[k]] for k in keys)
  return Examples(texts, _labels(data["label"], task))


def load_split(task: TaskSpec, split: str, *, data_dir: str = "", source: str = "auto", seed: int = 0,
               dev_fraction: float = 0.1, max_examples: int = 0, hub_dataset: str = "") -> Examples:
  """Returns the raw examples of ``split`` ("train" or "validation") from the chosen source.

  ``source="auto"`` reads ``data_dir`` when set and the HF hub otherwise. ``max_examples > 0``
  keeps the first N rows.
  """
  if source == "auto":
    source = "local" if data_dir else "hub"
  if source == "local":
    if not data_dir:
      raise DataUnavailableError(f"data_source=local needs a path; pass {FIX_FLAGS}.")
    ex = _load_local(task, split, data_dir, seed, dev_fraction)
  elif source == "hub":
    ex = _load_hub(task, split, hub_dataset)
  elif source == "tfds":
    ex = _load_tfds(task, split, hub_dataset)
  else:
    raise ValueError(f"unknown data source {source!r}; use auto, local, hub or tfds")
  return ex.take(np.arange(min(max_examples, len(ex)))) if max_examples > 0 else ex
