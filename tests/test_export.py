"""Export to the HF ecosystem: HF PyTorch loads the directory and matches our logits (issue 18).

Tiny workdirs are trained for two steps through the real ``train_and_evaluate``
(a BERT classifier and a from-scratch GPT-2 LM), then exported. At k = 1 with
a flat profile (no elimination) HF PyTorch's logits must match ours to 1e-4,
and ``models.from_pretrained`` must load the export back bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.serving import export
from latadj_jax.runtime import config_lib
from latadj_jax.tasks import lm_eval
from latadj_jax.training import classifier, lm
from latadj_jax.tuning import offline

from conftest import make_sentences, tiny_config

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


@pytest.fixture(scope="module")
def clf_workdir(tiny_model_dir, tiny_sst2_dir, tmp_path_factory) -> Path:
  """Returns a tiny BERT SST-2 workdir trained 2 steps at k = 0.8 with an ACC profile, swept at k = 1."""
  workdir = tmp_path_factory.mktemp("clf")
  config = tiny_config(tiny_model_dir, tiny_sst2_dir, max_steps=2, num_epochs=1,
                       eval_every_epoch=False, eval_coeffs=(1.0,), time_repeats=1)
  classifier.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory) -> Path:
  """Returns a tiny from-scratch GPT-2 (byte tokens) workdir trained 2 steps at k = 0.9."""
  data = tmp_path_factory.mktemp("text")
  (data / "a.txt").write_text("\n".join(s for s, _ in make_sentences(120, 3)) + "\n")
  config = config_lib.load("lm_text")
  for k, v in dict(data_dir=str(data), block_size=32, max_len=32, buckets=(32,), batch_size=8,
                   eval_batch_size=8, max_train_examples=32, max_eval_examples=8, max_steps=2,
                   num_epochs=1, eval_every_epoch=False, eval_coeffs=(), checkpoint_every=2,
                   progress=False).items():
    config[k] = v
  config.gpt2.update(n_layer=2, n_embd=32, n_head=2, n_positions=64)
  workdir = tmp_path_factory.mktemp("lm")
  lm.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def clf_export(clf_workdir, tmp_path_factory) -> Path:
  return export.export(clf_workdir, tmp_path_factory.mktemp("clf_hf") / "out")


@pytest.fixture(scope="module")
def lm_export(lm_workdir, tmp_path_factory) -> Path:
  return export.export(lm_workdir, tmp_path_factory.mktemp("lm_hf") / "out")


def _flat_counts(n0: int, layers: int) -> tuple[int, ...]:
  counts = schedule.keep_counts(n0, 1.0, schedule.flat_profile(layers))
  assert counts == (n0,) * layers  # k = 1 with a flat profile keeps everything
  return counts


@pytest.mark.slow
def test_classifier_export_loads_in_hf_pytorch_with_matching_logits(clf_workdir, clf_export):
  assert {"config.json", "model.safetensors", "README.md", "tokenizer.json",
          "tokenizer_config.json"} <= {p.name for p in clf_export.iterdir()}
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(clf_export).eval()
  assert type(hf).__name__ == "BertForSequenceClassification"
  assert hf.config.id2label == {0: "negative", 1: "positive"}  # GLUE SST-2's label names
  assert hf.config.label2id == {"negative": 0, "positive": 1}
  tok = transformers.AutoTokenizer.from_pretrained(clf_export)
  texts = [s for s, _ in make_sentences(6, 7)]
  enc = tok(texts, padding=True, return_tensors="np")
  r = offline.restore(clf_workdir)
  assert tok(texts)["input_ids"] == r.tokenizer(texts)["input_ids"]
  ours = np.asarray(r.pre.model.apply(
      r.pre.params, models.Batch(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]),
      _flat_counts(enc["input_ids"].shape[1], 3)).logits)
  with torch.no_grad():
    theirs = hf(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
  assert np.abs(ours).max() > 1e-3  # a real comparison, not two zero heads
  np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


@pytest.mark.slow
def test_classifier_export_round_trips_through_from_pretrained(clf_workdir, clf_export):
  r = offline.restore(clf_workdir)
  pre = models.from_pretrained(str(clf_export))
  assert pre.report.missing == [] and pre.report.unused == []
  assert pre.model.config.num_labels == 2
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pre.params),
               jax.tree.map(np.asarray, r.pre.params))
  lat = pre.hf_config["latadj"]
  assert lat["train_coeff"] == pytest.approx(0.8)
  assert lat["profile"] == pytest.approx(list(r.run.profile))
  assert set(lat["schedules"]) == {"16", "32"}


@pytest.mark.slow
def test_model_card_states_profile_and_training_k(clf_workdir, clf_export):
  card = (clf_export / "README.md").read_text()
  run = offline.restore(clf_workdir).run
  assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
  assert "**Trained at k = 0.8**" in card
  assert f"EP = {[round(e, 4) for e in run.profile]}" in card and "(`acc`;" in card
  profile = json.loads((clf_workdir / "profile.json").read_text())
  for bucket, counts in profile["schedules"].items():
    assert f"| {bucket} | {counts} |" in card
  assert "## Results" in card and "| 1.0 |" in card  # the k = 1 sweep row of the workdir


@pytest.mark.slow
def test_lm_export_loads_in_hf_pytorch_with_matching_logits(lm_workdir, lm_export):
  hf = transformers.AutoModelForCausalLM.from_pretrained(lm_export).eval()
  assert type(hf).__name__ == "GPT2LMHeadModel"
  tok = transformers.AutoTokenizer.from_pretrained(lm_export)
  r = lm_eval.restore(lm_workdir)
  text = ["the film was great and the cast", "a dull plot with weak acting, bad"]
  ids = [tok(t)["input_ids"] for t in text]
  assert ids == [r.tokenizer(t)["input_ids"] for t in text]
  n = min(len(i) for i in ids)
  ids = np.array([i[:n] for i in ids], np.int32)
  ours = np.asarray(r.model.apply(r.params, models.Batch(ids, np.ones_like(ids)),
                                  _flat_counts(n, 2)).logits)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert ours.shape == theirs.shape == (2, n, len(tok))
  np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)
  card = (lm_export / "README.md").read_text()
  assert "pipeline_tag: text-generation" in card and "**Trained at k = 0.9**" in card
  assert "EP = [1.0, 1.0] (`flat`;" in card


@pytest.mark.slow
def test_lm_export_round_trips_through_from_pretrained(lm_workdir, lm_export):
  r = lm_eval.restore(lm_workdir)
  pre = models.from_pretrained(str(lm_export))
  assert pre.report.missing == []
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pre.params),
               jax.tree.map(np.asarray, r.params))


@pytest.mark.slow
def test_export_cli_and_its_errors(lm_workdir, tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  cmd = [sys.executable, "-m", "latadj_jax.export"]
  ok = subprocess.run(cmd + [f"--workdir={lm_workdir}", f"--out={tmp_path / 'hf'}"], cwd=tmp_path,
                      env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "wrote" in ok.stdout and "model.safetensors" in ok.stdout
  assert (tmp_path / "hf" / "config.json").is_file()
  bad = subprocess.run(cmd + [f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
  assert bad.stderr.startswith("error: ") and "Train first" in bad.stderr


def test_label_names():
  cfg = {"task": "mnli"}
  assert export.label_names(cfg, 3) == ["entailment", "neutral", "contradiction"]
  assert export.label_names({"task": "text_classification"}, 2) == ["LABEL_0", "LABEL_1"]
  assert export.label_names(cfg, 3, ["a", "b", "c"]) == ["a", "b", "c"]
  with pytest.raises(export.ExportError, match="needs 3 distinct names"):
    export.label_names(cfg, 3, ["a", "b"])
