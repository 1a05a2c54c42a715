"""Data readers (every local layout, hub fail-fast), tokenization and bucketed batching."""

import json
import time

import numpy as np
import pandas as pd
import pytest
import transformers

from latadj_jax.data import pipeline, sources
from latadj_jax.data.sources import DataUnavailableError, Examples, get_task, load_split

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + \
    "a the film was good bad very long not it is".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "vocab.txt"
  path.write_text("\n".join(VOCAB) + "\n")
  # transformers 5 ignores a `vocab_file=` keyword (leaving only the specials); `vocab=` reads it.
  tok = transformers.BertTokenizerFast(vocab=str(path))
  assert len(tok) == len(VOCAB)
  return tok


def write(path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


# --- tasks ------------------------------------------------------------------------------------
def test_tasks_and_overrides():
  assert set(sources.TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte", "mnli", "wnli",
                                "text_classification"}
  assert get_task("mnli").eval_split == "validation_matched" and get_task("mnli").num_labels == 3
  stsb = get_task("stsb")
  assert stsb.is_regression and stsb.num_labels == 1 and stsb.main_metric == "pearson"
  assert get_task("text_classification", num_labels=5).num_labels == 5
  with pytest.raises(ValueError, match="sst2"):
    get_task("sst3")


# --- GLUE TSV layout --------------------------------------------------------------------------
def test_sst2_tsv_keeps_stray_quotes(tmp_path):
  write(tmp_path / "train.tsv", 'sentence\tlabel\nit \'s a " good film\t1\nbad\t0\n')
  ex = load_split(get_task("sst2"), "train", data_dir=str(tmp_path))
  assert ex.texts == (['it \'s a " good film', "bad"],)
  assert ex.labels.tolist() == [1, 0] and ex.labels.dtype == np.int64


def test_cola_tsv_has_no_header(tmp_path):
  write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tthe film was good .\ngj04\t0\t*\tfilm the good was .\n")
  ex = load_split(get_task("cola"), "validation", data_dir=str(tmp_path))  # GLUE root layout
  assert ex.texts == (["the film was good .", "film the good was ."],)
  assert ex.labels.tolist() == [1, 0]


def test_mrpc_tsv_with_bom(tmp_path):
  (tmp_path / "train.tsv").write_bytes(
      "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\ta film\tthe film\n"
      "0\t9\t10\tgood\tbad\n".encode("utf-8"))
  ex = load_split(get_task("mrpc"), "train", data_dir=str(tmp_path))
  assert ex.texts == (["a film", "good"], ["the film", "bad"])
  assert ex.labels.tolist() == [1, 0]


def test_stsb_tsv_is_regression(tmp_path):
  header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
  write(tmp_path / "stsb" / "dev.tsv", header + "0\tmain\tf\t2012\t1\tnone\tnone\ta film\tthe film\t4.250\n")
  ex = load_split(get_task("stsb"), "validation", data_dir=str(tmp_path))
  assert ex.texts == (["a film"], ["the film"])
  assert ex.labels.dtype == np.float32 and ex.labels.tolist() == [4.25]


def test_qnli_string_labels(tmp_path):
  write(tmp_path / "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tgood ?\tit is good .\tentailment\n"
        "1\tbad ?\tit is long .\tnot_entailment\n")
  ex = load_split(get_task("qnli"), "validation", data_dir=str(tmp_path))
  assert ex.texts == (["good ?", "bad ?"], ["it is good .", "it is long ."])
  assert ex.labels.tolist() == [0, 1]


def test_qqp_skips_malformed_rows(tmp_path):
  write(tmp_path / "train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "0\t1\t2\ta ?\tthe ?\t1\n1\t3\t4\tbroken row\n2\t5\t6\tgood ?\tbad ?\t0\n")
  ex = load_split(get_task("qqp"), "train", data_dir=str(tmp_path))
  assert ex.texts == (["a ?", "good ?"], ["the ?", "bad ?"]) and ex.labels.tolist() == [1, 0]


def test_mnli_reads_dev_matched(tmp_path):
  cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
          "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
  rows = [["0", "1", "1e", "fiction", "(", "(", "(", "(", "a film", "the film", "neutral", lab]
          for lab in ("entailment", "neutral", "contradiction")]
  write(tmp_path / "dev_matched.tsv", "\n".join("\t".join(r) for r in [cols] + rows) + "\n")
  write(tmp_path / "dev_mismatched.tsv", "\t".join(cols) + "\n")
  ex = load_split(get_task("mnli"), "validation", data_dir=str(tmp_path))
  assert ex.labels.tolist() == [0, 1, 2] and ex.texts[1] == ["the film"] * 3


# --- HF parquet layout ------------------------------------------------------------------------
def test_parquet_layouts(tmp_path):
  df = pd.DataFrame({"sentence": ["a", "b", "c"], "label": [1, 0, 1], "idx": [0, 1, 2]})
  df.to_parquet(tmp_path / "validation.parquet")
  ex = load_split(get_task("sst2"), "validation", data_dir=str(tmp_path), max_examples=2)
  assert ex.texts == (["a", "b"],) and ex.labels.tolist() == [1, 0]
  mnli = pd.DataFrame({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]})
  (tmp_path / "mnli").mkdir()
  mnli.to_parquet(tmp_path / "mnli" / "validation_matched.parquet")
  ex = load_split(get_task("mnli"), "validation", data_dir=str(tmp_path))
  assert ex.texts == (["p"], ["h"]) and ex.labels.tolist() == [2]


def test_missing_split_names_paths(tmp_path):
  with pytest.raises(DataUnavailableError, match=r"train\.parquet.*train\.tsv.*--config\.data_dir"):
    load_split(get_task("sst2"), "train", data_dir=str(tmp_path))
  with pytest.raises(DataUnavailableError, match="does not exist"):
    load_split(get_task("sst2"), "train", data_dir=str(tmp_path / "nope"))


# --- generic CSV / JSONL ----------------------------------------------------------------------
def test_csv_with_bom_and_signed_labels(tmp_path):
  (tmp_path / "train.csv").write_bytes(
      '\ufeff"1","good film"\n"-1","bad , film"\n"1","very good"\n'.encode("utf-8"))
  (tmp_path / "dev.csv").write_bytes('\ufeff"1","good"\n'.encode("utf-8"))
  task = get_task("text_classification")
  ex = load_split(task, "train", data_dir=str(tmp_path))
  assert ex.texts == (["good film", "bad , film", "very good"],) and ex.labels.tolist() == [1, 0, 1]
  # A dev file with only positives still maps 1 -> 1: the label map spans both files.
  assert load_split(task, "validation", data_dir=str(tmp_path)).labels.tolist() == [1]


def test_csv_header_and_string_labels(tmp_path):
  write(tmp_path / "train.csv", "label,text\npos,a\nneg,b\nneu,c\n")
  with pytest.raises(ValueError, match="num_labels=3"):
    load_split(get_task("text_classification"), "train", data_dir=str(tmp_path))
  ex = load_split(get_task("text_classification", num_labels=3), "train", data_dir=str(tmp_path))
  assert ex.labels.tolist() == [2, 0, 1]  # sorted: neg, neu, pos
  write(tmp_path / "num" / "train.csv", "label,text\n10,a\n2,b\n")
  ex = load_split(get_task("text_classification"), "train", data_dir=str(tmp_path / "num"))
  assert ex.labels.tolist() == [1, 0]  # numeric order: 2 before 10


def test_jsonl(tmp_path):
  lines = [json.dumps({"text": t, "label": l}) for t, l in (("good", 1), ("bad", 0))]
  write(tmp_path / "validation.jsonl", "\n".join(lines) + "\n")
  write(tmp_path / "train.jsonl", lines[0] + "\n")
  ex = load_split(get_task("text_classification"), "validation", data_dir=str(tmp_path))
  assert ex.texts == (["good", "bad"],) and ex.labels.tolist() == [1, 0]


def test_single_file_split_is_deterministic(tmp_path):
  path = write(tmp_path / "all.csv", "".join(f'"{1 if i % 2 else -1}","text {i}"\n' for i in range(50)))
  task = get_task("text_classification")
  load = lambda split, seed: load_split(task, split, data_dir=str(path), seed=seed, dev_fraction=0.2)
  train, dev = load("train", 0), load("validation", 0)
  assert len(train) == 40 and len(dev) == 10
  assert sorted(train.texts[0] + dev.texts[0]) == sorted(f"text {i}" for i in range(50))
  assert load("validation", 0).texts == dev.texts
  assert load("validation", 1).texts != dev.texts
  assert all(lab == int(t.split()[1]) % 2 for t, lab in zip(dev.texts[0], dev.labels))
  # A label-sorted file still gives mixed labels in a short prefix (max_examples takes a prefix).
  sorted_path = write(tmp_path / "sorted.csv", "".join(f'"{1 if i < 25 else -1}","t {i}"\n' for i in range(50)))
  head = load_split(task, "train", data_dir=str(sorted_path), max_examples=10).labels
  assert 0 < head.sum() < 10


# --- hub ---------------------------------------------------------------------------------------
def test_hub_offline_fails_fast(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.perf_counter()
  with pytest.raises(DataUnavailableError, match="--config.data_dir") as err:
    load_split(get_task("sst2"), "train", source="auto")
  assert time.perf_counter() - start < 2.0
  assert "nyu-mll/glue" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_hub_unreachable_fails_fast(monkeypatch):
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
  with pytest.raises(DataUnavailableError, match="cannot be reached.*--config.data_source=tfds"):
    load_split(get_task("rte"), "validation", source="hub")


# --- tokenization -----------------------------------------------------------------------------
def test_encode_counts_truncation(tokenizer):
  ex = Examples((["good", "a film was very good", "a film was very very good ."],), np.array([1, 1, 0]))
  enc = pipeline.encode(ex, tokenizer, max_len=7)  # [CLS] + 5 words + [SEP] fits exactly
  assert [len(x) for x in enc.input_ids] == [3, 7, 7]
  assert enc.num_truncated == 1 and enc.input_ids[2][-1] == tokenizer.sep_token_id
  assert enc.input_ids[0].dtype == np.int32 and enc.labels.tolist() == [1, 1, 0]


def test_encode_pairs(tokenizer):
  ex = Examples((["a film", "a film was very very long", "a film was"], ["good", "not bad", "it is"]),
                np.array([0, 1, 1]))
  enc = pipeline.encode(ex, tokenizer, max_len=8)  # 3 specials + 5 words fit
  assert enc.num_truncated == 1
  assert enc.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1]
  # longest_first cuts the longer first sentence (6 -> 3 words) and keeps the 2-word second one.
  assert tokenizer.decode(enc.input_ids[1]) == "[CLS] a film was [SEP] not bad [SEP]"
  assert enc.token_type_ids[1].tolist() == [0] * 5 + [1] * 3
  assert len(enc.input_ids[2]) == 8  # exactly full: not truncated


# --- bucketing --------------------------------------------------------------------------------
def test_make_buckets_and_bucket_of():
  assert pipeline.make_buckets(128) == (32, 64, 128)
  assert pipeline.make_buckets(100) == (32, 64, 100)
  assert pipeline.make_buckets(32, base=(16, 32)) == (16, 32)
  assert [pipeline.bucket_of(n, (8, 16)) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
  with pytest.raises(ValueError):
    pipeline.bucket_of(17, (8, 16))


def ragged(lengths, labels=None) -> pipeline.Encoded:
  ids = [np.arange(1, n + 1, dtype=np.int32) + 100 * i for i, n in enumerate(lengths)]
  labels = np.arange(len(lengths)) if labels is None else labels
  return pipeline.Encoded(ids, [np.zeros(n, np.int32) for n in lengths], labels, 0, 16)


LENGTHS = [3, 12, 5, 16, 8, 2, 9, 4, 11, 7, 1]  # 7 fit bucket 8, 4 need bucket 16


def test_batches_pad_to_smallest_bucket():
  enc = ragged(LENGTHS)
  batches = list(pipeline.batch_iterator(enc, 3, (8, 16), shuffle=False, pad_id=7))
  assert pipeline.num_batches(enc, 3, (8, 16)) == len(batches) == 3 + 2
  for b in batches:
    real = b["index"] >= 0
    length = b["input_ids"].shape[1]
    assert all(pipeline.bucket_of(LENGTHS[i], (8, 16)) == length for i in b["index"][real])
    assert b["input_ids"].shape == (3, length) and b["input_ids"].dtype == np.int32
    for row, i in zip(range(3), b["index"]):
      n = LENGTHS[i] if i >= 0 else 0
      assert b["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
      assert (b["input_ids"][row, n:] == 7).all()
      if i >= 0:
        assert b["input_ids"][row, :n].tolist() == enc.input_ids[i].tolist()
        assert b["labels"][row] == i and b["weights"][row] == 1.0
      else:
        assert b["weights"][row] == 0.0
  assert [b["input_ids"].shape[1] for b in batches] == [8, 8, 8, 16, 16]
  assert batches[0]["index"].tolist() == [0, 2, 4]  # by bucket, then input order
  assert batches[2]["index"].tolist() == [10, -1, -1]


def epoch_indices(enc, seed, epoch, **kw):
  return [b["index"].tolist() for b in pipeline.batch_iterator(enc, 3, (8, 16), shuffle=True,
                                                               seed=seed, epoch=epoch, **kw)]


def test_each_example_once_per_epoch_and_shuffle_is_deterministic():
  enc = ragged(LENGTHS)
  e0 = epoch_indices(enc, 0, 0)
  assert sorted(i for b in e0 for i in b if i >= 0) == list(range(len(LENGTHS)))
  assert e0 == epoch_indices(enc, 0, 0)
  assert e0 != epoch_indices(enc, 0, 1) and e0 != epoch_indices(enc, 1, 0)
  unshuffled = [b["index"].tolist() for b in pipeline.batch_iterator(enc, 3, (8, 16), shuffle=False)]
  assert e0 != unshuffled


def test_start_batch_matches_skipping():
  enc = ragged(LENGTHS, labels=np.linspace(0, 1, len(LENGTHS)).astype(np.float32))
  full = list(pipeline.batch_iterator(enc, 3, (8, 16), shuffle=True, seed=3, epoch=2))
  resumed = list(pipeline.batch_iterator(enc, 3, (8, 16), shuffle=True, seed=3, epoch=2, start_batch=2))
  assert len(resumed) == len(full) - 2
  for a, b in zip(full[2:], resumed):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert full[0]["labels"].dtype == np.float32
