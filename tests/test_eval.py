"""Offline tuning, the executable cache and eval.py's error messages (issues 3 and 4).

Every test here reads a trained workdir or starts eval.py: the whole module is slow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from latadj_jax.core import schedule
from latadj_jax.data import splits
from latadj_jax import models
from latadj_jax.runtime.executables import ExecutableCache
from latadj_jax.tasks import classify
from latadj_jax.tuning import offline
from latadj_jax.tuning.sweep import schedules_for

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tiny_classifier_workdir):
  """The session's tiny trained workdir, this module's copy (eval.py writes its results there)."""
  return tiny_classifier_workdir


def _classifier(workdir):
  r = offline.restore(workdir)
  (enc,) = splits.load_encoded_split(r.run.config, r.task, r.tokenizer, "validation")
  return r, classify.Classifier(r.pre.model, r.pre.params, enc, r.buckets, 8, "tiny")


def test_equal_keep_counts_share_one_executable(workdir):
  r, clf = _classifier(workdir)
  ep = r.run.profile
  k1, k2 = 0.9, 0.9004
  assert schedules_for(k1, ep, r.buckets) == schedules_for(k2, ep, r.buckets)
  clf.predict(schedules_for(k1, ep, r.buckets))
  misses = clf.cache.stats.misses
  clf.predict(schedules_for(k2, ep, r.buckets))
  assert clf.cache.stats.misses == misses and len(clf.cache) == misses
  assert clf.cache.stats.hits > 0


def test_coeff_one_flat_equals_plain_forward(workdir):
  r, clf = _classifier(workdir)
  flat = schedule.flat_profile(r.pre.model.num_layers)
  logits = clf.predict(schedules_for(1.0, flat, r.buckets))
  for batch in clf.batches():
    plain = r.pre.model.apply(r.pre.params, models.Batch.of(batch)).logits
    real = batch["index"] >= 0
    # Same math; the AOT executable and eager apply may fuse differently (ulp-level).
    np.testing.assert_allclose(logits[batch["index"][real]], np.asarray(plain)[real],
                               atol=1e-6, rtol=0)


def test_dtype_override_evaluates_in_bf16_beside_float32_results(workdir):
  (f32,) = offline.evaluate_workdir(workdir, [1.0], time_repeats=1)
  r = offline.restore(workdir, "bfloat16")
  assert {x.dtype.name for x in jax.tree.leaves(r.pre.params)} == {"bfloat16"}
  (bf16,) = offline.evaluate_workdir(workdir, [1.0], time_repeats=1, dtype="bfloat16")
  stored = json.loads((workdir / "eval_results_bfloat16.json").read_text())
  assert stored["dtype"] == "bfloat16" and stored["rows"][0]["accuracy"] == bf16["accuracy"]
  assert json.loads((workdir / "eval_results.json").read_text())["dtype"] == "float32"
  assert abs(bf16["accuracy"] - f32["accuracy"]) <= 0.1   # same model, coarser arithmetic


def _eval_cli(*args, cwd=REPO):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, "eval.py", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_second_process_finds_executables_on_disk(workdir, tmp_path):
  cache = tmp_path / "xla"
  args = ["--workdir", str(workdir), "--coeff", "0.8,1.0", "--cache_dir", str(cache), "--repeats", "2"]
  first = _eval_cli(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  entries = set(os.listdir(cache))
  stats1 = json.loads((workdir / "eval_results.json").read_text())["cache"]
  second = _eval_cli(*args)
  assert second.returncode == 0, second.stderr[-3000:]
  stats2 = json.loads((workdir / "eval_results.json").read_text())["cache"]
  # Every compile writes an entry (min size/time thresholds are off), so nothing new on
  # disk means every executable came from the persistent cache.
  assert len(entries) >= stats1["misses"] > 0
  assert set(os.listdir(cache)) == entries
  assert stats2["misses"] == stats1["misses"]
  assert "accuracy" in first.stdout and "| coeff |" in first.stdout


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "abc"])
def test_bad_coeff_is_a_one_line_error(workdir, bad):
  proc = _eval_cli("--workdir", str(workdir), f"--coeff={bad}")
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:") and "coeff" in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_workdir_without_checkpoint_is_a_one_line_error(tmp_path):
  proc = _eval_cli("--workdir", str(tmp_path), "--coeff", "0.9")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "not a training workdir" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_executables_serialized_to_disk_load_without_lowering(workdir, tmp_path):
  r, clf = _classifier(workdir)
  counts = schedules_for(0.8, r.run.profile, r.buckets)
  clf.cache = ExecutableCache(disk_dir=tmp_path)
  first = clf.predict(counts)
  assert clf.cache.stats.disk_hits == 0 and len(list(tmp_path.glob("*.exe"))) == len(r.buckets)
  clf.cache = ExecutableCache(disk_dir=tmp_path)   # a new process, in effect
  lowered = []
  original = clf.cache.get
  clf.cache.get = lambda key, lower: original(key, lambda: lowered.append(key) or lower())
  again = clf.predict(counts)
  assert lowered == [] and clf.cache.stats.disk_hits == len(r.buckets)
  np.testing.assert_array_equal(first, again)
  stale = ExecutableCache(disk_dir=tmp_path)
  stale._fingerprint = "other model code"               # an edited model never loads old programs
  clf.cache = stale
  clf.predict(counts)
  assert stale.stats.disk_hits == 0 and stale.stats.misses == len(r.buckets)
