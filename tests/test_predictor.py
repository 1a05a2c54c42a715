"""The Predictor API and eval.py's --speedup, --calibrate and --latency_ms (issue 10)."""

import doctest
import json

import numpy as np
import pytest

from latadj_jax.data import pipeline, splits
from latadj_jax.serving import predictor
from latadj_jax.runtime.executables import ExecutableCache
from latadj_jax.tasks import classify
from latadj_jax.tuning import offline, targets
from latadj_jax.tuning.sweep import schedules_for

from test_eval import _eval_cli


@pytest.fixture(scope="module")
def workdir(tiny_classifier_workdir):
  """The session's tiny trained workdir, this module's copy (calibration writes there)."""
  return tiny_classifier_workdir


@pytest.fixture(scope="module")
def dev(workdir):
  """Returns (restored, raw dev examples, encoded dev examples) of the tiny workdir."""
  r = offline.restore(workdir)
  ex = splits.load_split(r.run.config, r.task, "validation")
  (enc,) = splits.load_encoded_split(r.run.config, r.task, r.tokenizer, "validation")
  return r, ex, enc


@pytest.fixture(scope="module")
def cache():
  """One executable cache for the module, so each schedule compiles once across tests."""
  return ExecutableCache()


def _eval_logits(r, enc, schedules, cache):
  """Returns the logits eval.py's path (Classifier.predict) gives, in input order."""
  return offline.classifier(r, enc, cache).predict(schedules)


@pytest.mark.slow
def test_predictor_equals_eval_predictions_in_input_order(workdir, dev, cache):
  r, ex, enc = dev
  lengths = {pipeline.bucket_of(len(ids), r.buckets) for ids in enc.input_ids}
  assert lengths == set(r.buckets)  # the dev set spans both buckets: mixed lengths
  ref = _eval_logits(r, enc, schedules_for(0.8, r.run.profile, r.buckets), cache)
  order = np.random.default_rng(0).permutation(len(ex))
  p = predictor.Predictor.from_workdir(workdir, coeff=0.8, cache=cache)
  out = p.predict([ex.texts[0][i] for i in order])
  np.testing.assert_allclose(out.logits, ref[order], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out.labels, classify.predictions(ref, False)[order])
  np.testing.assert_allclose(out.probabilities.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(out.probabilities.argmax(-1), out.labels)
  assert out.scores is None


@pytest.mark.slow
def test_speedup_target_agrees_with_eval_cli(workdir, dev, cache):
  r, ex, enc = dev
  p = predictor.Predictor.from_workdir(workdir, speedup=1.5, cache=cache)
  assert all(c.met and c.expected_speedup >= 1.5 for c in p.choices.values())
  ref = _eval_logits(r, enc, p.schedules, cache)
  out = p.predict(ex.texts[0])
  np.testing.assert_allclose(out.logits, ref, atol=1e-5, rtol=0)
  proc = _eval_cli("--workdir", str(workdir), "--speedup", "1.5", "--repeats", "1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for b, c in p.choices.items():  # the CLI prints the k chosen and the schedule per bucket
    assert f"bucket {b}: k = {c.k:.10g}" in proc.stdout and str(list(c.counts)) in proc.stdout
  (row,) = json.loads((workdir / "eval_results.json").read_text())["rows"]
  assert row["choices"] == {str(b): c.to_json() for b, c in sorted(p.choices.items())}
  assert row["accuracy"] == pytest.approx(np.mean(out.labels == ex.labels))


@pytest.mark.slow
def test_docstring_example_runs_and_warmup_compiles_every_bucket(workdir):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  (test,) = [t for t in doctest.DocTestFinder().find(
      predictor.Predictor, "Predictor", globs={"workdir": workdir, "Predictor": predictor.Predictor})
      if t.examples]
  runner.run(test, clear_globs=False)
  assert runner.tries >= 4 and runner.failures == 0
  p = test.globs["predictor"]  # warmup() compiled each bucket once; predict() only hit the cache
  assert p.cache.stats.misses == len(p.restored.buckets) == len(p.cache)
  assert p.cache.stats.hits > 0


@pytest.mark.slow
def test_overlong_text_is_truncated_with_a_warning(workdir, cache):
  p = predictor.Predictor.from_workdir(workdir, cache=cache)
  long_text = " ".join(["the film was good"] * 20)  # 80 words, max_len 32
  with pytest.warns(UserWarning, match="1 of 2 inputs .* truncated"):
    out = p.predict([long_text, "dull"])
  assert out.labels.shape == (2,)


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(workdir, cache):
  p = predictor.Predictor.from_workdir(workdir, cache=cache)
  with pytest.raises(ValueError, match=r"wrap a single text"):
    p.predict("a great film")
  with pytest.raises(ValueError, match="one text per example"):
    p.predict([("a great film", "a dull film")])
  empty = p.predict([])
  assert empty.labels.shape == (0,) and empty.probabilities.shape == (0, 2)


def test_pairs_and_regression_outputs():
  ex = predictor.to_examples([("a", "b"), ["c", "d"]], 2)
  assert ex.texts == (["a", "c"], ["b", "d"]) and list(ex.labels) == [-1, -1]
  with pytest.raises(ValueError, match="text pairs"):
    predictor.to_examples(["a"], 2)
  reg = predictor.to_prediction(np.array([[0.3], [1.2]], np.float32), is_regression=True)
  np.testing.assert_allclose(reg.scores, [0.3, 1.2])
  assert reg.labels is None and reg.probabilities is None


@pytest.mark.slow
def test_impossible_targets_raise_before_loading(workdir):
  with pytest.raises(targets.TargetError, match="1000x is out of reach"):
    predictor.Predictor.from_workdir(workdir, speedup=1000)
  with pytest.raises(targets.TargetError, match="--calibrate --batch_size 3"):
    predictor.Predictor.from_workdir(workdir, latency_ms=5, batch_size=3)
  with pytest.raises(ValueError, match="at most one"):
    predictor.Predictor.from_workdir(workdir, coeff=0.9, speedup=2)


@pytest.mark.slow
def test_cli_impossible_speedup_is_one_line(workdir):
  proc = _eval_cli("--workdir", str(workdir), "--speedup", "1000")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith("error: expected speedup 1000x is out of reach")
  assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_calibration_and_latency_budget(workdir, dev, cache):
  r, ex, _ = dev
  path = offline.calibrate_workdir(workdir, points=3, repeats=1, cache=cache)
  table = json.loads(path.read_text())
  assert path.name.startswith("calibration_") and path.name.endswith("_b8.json")
  assert table["device"] and set(table["buckets"]) == {str(b) for b in r.buckets}
  for b, entries in table["buckets"].items():
    assert entries[0]["counts"] == [int(b)] * 3 and entries[-1]["counts"] == [1, 1, 1]
    assert all(e["latency_ms"] > 0 for e in entries)
  misses = cache.stats.misses
  roomy = predictor.Predictor.from_workdir(workdir, latency_ms=1e6, cache=cache)
  for b, c in roomy.choices.items():  # a roomy budget: no elimination at all
    assert c.met and c.counts == (b,) * 3 and c.latency_ms == table["buckets"][str(b)][0]["latency_ms"]
  roomy.predict(ex.texts[0])
  assert cache.stats.misses == misses  # calibration already compiled these
  with pytest.raises(targets.TargetError, match="out of reach"):
    predictor.Predictor.from_workdir(workdir, latency_ms=1e-6)
  proc = _eval_cli("--workdir", str(workdir), "--latency_ms", "1e-6")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "latency budget 1e-06 ms per batch of 8 is out of reach" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
