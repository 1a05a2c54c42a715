"""Speedup targets and latency budgets (issue 10): the k solved for, checked against brute force."""

import json
import math

import numpy as np
import pytest

from latadj_jax.core import schedule
from latadj_jax.tuning import targets

FITTED = (0.9, 0.95, 0.9, 0.93, 0.96, 1.0)
PROFILES = {"flat": schedule.flat_profile(6), "fitted": FITTED}


def _grid_speedups(n0, profile, ks):
  return np.array([schedule.expected_speedup(n0, schedule.keep_counts(n0, k, profile)) for k in ks])


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("n0", [16, 40])
def test_chosen_k_is_the_largest_reaching_the_target_by_brute_force(name, n0):
  profile = PROFILES[name]
  top = targets.k_ceiling(profile)
  ks = np.linspace(0.01, top, 20001)
  step = ks[1] - ks[0]
  speedups = _grid_speedups(n0, profile, ks)
  assert np.all(np.diff(speedups) <= 1e-12)  # expected speedup falls as k rises
  for target in (1.0, 1.3, 1.5, 2.0, 2.5, 3.0, 4.0):
    c = targets.solve_speedup(n0, profile, target)
    assert c.met and c.bucket == n0
    assert c.counts == schedule.keep_counts(n0, c.k, profile)
    assert c.counts == schedule.keep_counts(n0, c.k_lo, profile)
    assert c.expected_speedup == schedule.expected_speedup(n0, c.counts) >= target
    best_grid = ks[speedups >= target].max()
    assert best_grid <= c.k + 1e-12  # no grid k above the answer still reaches the target
    if c.k < top:
      assert c.k - best_grid < step  # ... and the answer is no further than one grid step up
      above = schedule.keep_counts(n0, c.k * (1 + 1e-7), profile)
      assert schedule.expected_speedup(n0, above) < target  # just above it, the target is missed
    else:
      assert c.counts == (n0,) * len(profile)


def test_speedup_one_is_no_elimination_and_k_ceiling_saturates():
  assert targets.k_ceiling(FITTED) == pytest.approx(1 / 0.9)
  c = targets.solve_speedup(40, FITTED, 1.0)
  assert c.counts == (40,) * len(FITTED) and c.expected_speedup == 1.0
  assert c.k == targets.k_ceiling(FITTED)


def test_ladder_runs_from_no_elimination_to_one_per_layer():
  steps = targets.ladder(40, FITTED)
  assert steps[0].counts == (40,) * 6 and steps[-1].counts == (1,) * 6
  assert len({s.counts for s in steps}) == len(steps)


def test_per_bucket_k_differs_and_each_reaches_the_target():
  choices = targets.for_speedup((16, 32, 64), FITTED, 2.0)
  assert set(choices) == {16, 32, 64}
  assert all(c.expected_speedup >= 2.0 for c in choices.values())
  assert len({c.k for c in choices.values()}) > 1


def test_impossible_speedup_is_a_clear_error():
  with pytest.raises(targets.TargetError,
                     match=r"1000x is out of reach.*at most \d+\.\d\dx in bucket 16"):
    targets.for_speedup((16, 32), FITTED, 1000)
  loose = targets.for_speedup((16,), FITTED, 1000, strict=False)[16]
  assert not loose.met and loose.counts == (1,) * 6
  assert loose.expected_speedup == pytest.approx(targets.max_speedup(16, 6))


@pytest.mark.parametrize("bad", [0, 0.5, -2, float("nan"), float("inf"), "abc", None])
def test_bad_speedup_raises(bad):
  with pytest.raises(ValueError, match="speedup"):
    targets.validate_speedup(bad)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "x"])
def test_bad_latency_raises(bad):
  with pytest.raises(ValueError, match="latency_ms"):
    targets.validate_latency_ms(bad)


def test_choose_takes_at_most_one_target():
  with pytest.raises(ValueError, match="at most one"):
    targets.choose((16,), FITTED, coeff=0.9, speedup=2.0)
  assert targets.choose((16,), FITTED)[16].k == 1.0  # the default is k = 1, as in eval.py
  assert targets.choose((16,), FITTED, coeff=0.8)[16].counts == schedule.keep_counts(16, 0.8, FITTED)
  with pytest.raises(targets.TargetError, match="--calibrate"):
    targets.choose((16,), FITTED, latency_ms=5.0)


def test_calibration_grid_spans_the_range_and_holds_k1():
  grid = targets.calibration_grid(64, FITTED, points=6)
  counts = [g.counts for g in grid]
  assert counts[0] == (64,) * 6 and counts[-1] == (1,) * 6
  assert schedule.keep_counts(64, 1.0, FITTED) in counts
  speedups = [schedule.expected_speedup(64, c) for c in counts]
  assert speedups == sorted(speedups) and len(set(counts)) == len(counts)
  assert 6 <= len(grid) <= 7


def _table(latencies, bucket=32):
  grid = targets.calibration_grid(bucket, FITTED, points=len(latencies))[:len(latencies)]
  entries = [{"counts": list(g.counts), "k_lo": g.k_lo, "k_hi": g.k_hi,
              "expected_speedup": schedule.expected_speedup(bucket, g.counts), "latency_ms": ms}
             for g, ms in zip(grid, latencies)]
  return {"device": "TestDevice", "batch_size": 8, "profile": list(FITTED), "repeats": 1,
          "buckets": {str(bucket): entries}}


def test_budget_picks_the_least_elimination_that_fits():
  table = _table([10.0, 8.0, 6.5, 5.0, 4.0, 3.0])
  entries = table["buckets"]["32"]
  assert targets.for_budget(table, (32,), 100)[32].counts == tuple(entries[0]["counts"])
  c = targets.for_budget(table, (32,), 6.0)[32]
  assert c.met and c.latency_ms == 5.0 and c.counts == tuple(entries[3]["counts"])
  assert c.k == entries[3]["k_hi"]
  # A noisy, non-monotone table: still the first (least elimination) entry within budget.
  noisy = _table([10.0, 4.5, 6.5, 4.0])
  assert targets.for_budget(noisy, (32,), 5.0)[32].latency_ms == 4.5


def test_impossible_budget_is_a_clear_error():
  table = _table([10.0, 8.0, 3.0])
  with pytest.raises(targets.TargetError, match=r"0.5 ms per batch of 8 is out of reach on "
                     r"TestDevice: no calibrated schedule fits.*3 ms in bucket 32"):
    targets.for_budget(table, (32,), 0.5)
  loose = targets.for_budget(table, (32,), 0.5, strict=False)[32]
  assert not loose.met and loose.latency_ms == 3.0
  with pytest.raises(targets.TargetError, match="no bucket"):
    targets.for_budget(table, (16, 32), 5.0)


def test_calibration_file_is_named_by_device_and_checked_for_profile(tmp_path, monkeypatch):
  path = targets.calibration_path(tmp_path, "GPU NVIDIA H100 80GB HBM3", 8)
  assert path.name == "calibration_gpu-nvidia-h100-80gb-hbm3_b8.json"
  with pytest.raises(targets.TargetError, match="--calibrate --batch_size 8"):
    targets.load_calibration(tmp_path, 8, FITTED)
  monkeypatch.setattr(targets.timing, "device_name", lambda: "TestDevice")
  table = _table([2.0, 1.0])
  saved = targets.save_calibration(tmp_path, table)
  assert saved == targets.calibration_path(tmp_path, "TestDevice", 8)
  assert targets.load_calibration(tmp_path, 8, FITTED) == json.loads(saved.read_text())
  with pytest.raises(targets.TargetError, match="another elimination profile"):
    targets.load_calibration(tmp_path, 8, schedule.flat_profile(6))


def test_format_choices_gives_k_and_counts_per_bucket():
  text = targets.format_choices(targets.for_speedup((16, 32), FITTED, 2.0), "target 2x")
  lines = text.splitlines()
  assert lines[0] == "target 2x" and len(lines) == 3
  assert lines[1].startswith("  bucket 16: k = ") and "keep counts [" in lines[1]
  c = targets.solve_speedup(32, FITTED, 2.0)
  assert f"{c.k:.10g}" in lines[2] and math.isfinite(c.k)
