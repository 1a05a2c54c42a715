"""Schedule math on hand-computed cases (docs/method.md sections 2, 3, 5)."""

import math

import numpy as np
import pytest

from latadj_jax.core import schedule


def test_keep_counts_hand_computed():
  # R = 0.8 everywhere: 64 -> 51 -> 40 -> 32 -> 25 (floor each time).
  assert schedule.keep_counts(64, 0.8, schedule.flat_profile(4)) == (51, 40, 32, 25)
  # k * EP is capped at 1: a profile value of 1 with k > 1 keeps everything.
  assert schedule.keep_counts(10, 1.2, (1.0, 0.5)) == (10, 6)


def test_expected_speedup_matches_eq7_for_r08_l12():
  counts = schedule.keep_counts(128, 0.8, schedule.flat_profile(12))
  prev = [128] + list(counts[:-1])
  ne = [0.25 * p + 0.75 * n for p, n in zip(prev, counts)]
  assert schedule.expected_speedup(128, counts) == pytest.approx(12 * 128 / sum(ne))
  # Continuous check of the same formula: N_l = 0.8^l N0 up to flooring.
  cont = sum(0.25 * 0.8 ** (l - 1) + 0.75 * 0.8 ** l for l in range(1, 13))
  assert schedule.expected_speedup(128, counts) == pytest.approx(12 / cont, rel=0.05)


def test_flat_profile_at_k1_keeps_everything():
  assert schedule.keep_counts(37, 1.0, schedule.flat_profile(6)) == (37,) * 6
  assert schedule.expected_speedup(37, (37,) * 6) == 1.0


def test_minimum_of_one_holds():
  assert schedule.keep_counts(8, 0.1, schedule.flat_profile(5)) == (1, 1, 1, 1, 1)


def test_floor_is_robust_to_float_error():
  # 0.7 * 10 is 6.999999999999999 in floating point; the rule means 7.
  assert schedule.keep_counts(10, 0.7, (1.0,)) == (7,)


def test_rising_acc_halts_elimination():
  # F falls, then rises at layer 3: EP = 1 from layer 3 on, even where F falls again.
  fit = [0.9, 0.72, 0.8, 0.4]
  ep = schedule.profile_from_fit(fit)
  assert ep[0] == pytest.approx(0.9)
  assert ep[1] == pytest.approx(0.8)
  assert ep[2:] == (1.0, 1.0)


def test_profile_from_acc_uses_the_fit_not_the_raw_points():
  # Points on a line plus alternating noise: the fit is the line, not the points.
  line = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
  noise = np.array([0.02, -0.02, 0.02, -0.02, 0.02, -0.02])
  prof = schedule.profile_from_acc(line + noise, degree=1)
  np.testing.assert_allclose(prof.fit, line + np.polyval(np.polyfit(np.arange(1, 7), noise, 1), np.arange(1, 7)))
  exact = schedule.profile_from_acc(line, degree=1)
  np.testing.assert_allclose(exact.ep, [0.9, 0.8 / 0.9, 0.7 / 0.8, 0.6 / 0.7, 0.5 / 0.6, 0.4 / 0.5])
  assert exact.acc == tuple(line)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "abc", None])
def test_bad_coeff_raises(bad):
  with pytest.raises(ValueError, match="coeff"):
    schedule.keep_counts(64, bad, schedule.flat_profile(2))


@pytest.mark.parametrize("profile", [(1.0,), (1.0, 0.0), (1.0, 1.5), (1.0, float("nan"))])
def test_bad_profile_raises(profile):
  with pytest.raises(ValueError, match="profile"):
    schedule.validate_profile(profile, 2)


def test_distinct_schedules_agree_with_a_fine_grid():
  profile = (0.9, 0.85, 1.0, 0.7)
  intervals = schedule.distinct_schedules(40, profile, k_min=0.3, k_max=1.2)
  seen = {iv.counts for iv in intervals}
  assert len(seen) == len(intervals)  # distinct
  for k in np.linspace(0.3, 1.2, 3001):
    counts = schedule.keep_counts(40, k, profile)
    assert counts in seen
    iv = next(iv for iv in intervals if iv.counts == counts)
    assert iv.k_lo - 1e-6 <= k <= iv.k_hi + 1e-6
  for iv in intervals:  # both ends really give the schedule
    assert schedule.keep_counts(40, iv.k_lo, profile) == iv.counts
    assert schedule.keep_counts(40, iv.k_hi, profile) == iv.counts
  speedups = [schedule.expected_speedup(40, iv.counts) for iv in intervals]
  assert speedups == sorted(speedups)  # less k, more speedup
  assert math.isclose(intervals[0].k_hi, 1.2)


def test_step_profile_cuts_once_at_its_layer():
  ep = schedule.parse_profile("step3@0.25", 6)
  assert ep == schedule.step_profile(6, 3, 0.25) == (1.0, 1.0, 0.25, 1.0, 1.0, 1.0)
  assert schedule.keep_counts(64, 1.0, ep) == (64, 64, 16, 16, 16, 16)


@pytest.mark.parametrize("spec", ["step0@0.5", "step7@0.5", "step3@1.5", "step3@0"])
def test_bad_step_profile_raises(spec):
  with pytest.raises(ValueError):
    schedule.parse_profile(spec, 6)
