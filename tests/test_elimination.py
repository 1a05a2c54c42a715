"""``core/elimination.py``'s pure functions on tiny hand-built arrays, against exact values.

Score vectors (bidirectional and eq. 8), the column sums and their causal
divisor, ACC, the survivor rankings and Sort+Eliminate (``select_indices``,
``gather``, ``eliminate``), alone and as one causal layer chains them. How
the models run them is tested beside the models (``test_stack.py`` for the
loop, ``test_bert.py``, ``test_decoder.py``, ``test_t5.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latadj_jax.core import elimination as el

# Left- and right-padded rows, used by the mask tests.
PADDED = jnp.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], bool)


def _causal_probs():
  """Returns 1x1x4x4 lower-triangular attention whose column sums are 1.8, 1.0, 0.8, 0.4."""
  rows = [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]]
  return jnp.array([[rows]], jnp.float32)


# Eq. 8 on _causal_probs: column j divided by the 4 - j queries that see it.
CAUSAL_SV = [1.8 / 4, 1.0 / 3, 0.8 / 2, 0.4 / 1]


# --- score vectors -------------------------------------------------------------------------------

def test_bidirectional_score_vector_sums_valid_queries_and_zeroes_pads():
  # Two heads over 3 slots, the last a pad; its query row must not count, nor its column.
  head0 = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
  head1 = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]]
  probs = jnp.array([[head0, head1]], jnp.float32)
  valid = jnp.array([[1, 1, 0]], bool)
  sv = np.asarray(el.score_vector(probs, valid))
  # Head mean: query 0 -> (0.5, 0.5), query 1 -> (0.75, 0.25); summed over the two queries.
  np.testing.assert_allclose(sv, [[1.25, 0.75, 0.0]], rtol=1e-6)
  assert sv[0, :2].mean() == pytest.approx(1.0)  # rows summing to 1: the valid-token mean is 1
  only_q1 = el.score_vector(probs, valid, queries_BxN=jnp.array([[0, 1, 1]]))  # pads never count
  np.testing.assert_allclose(np.asarray(only_q1), [[0.75, 0.25, 0.0]], rtol=1e-6)


def test_causal_score_vector_divides_by_the_queries_that_see_each_column():
  probs, valid = _causal_probs(), jnp.ones((1, 4), bool)
  np.testing.assert_allclose(np.asarray(el.score_vector(probs, valid, causal=True)), [CAUSAL_SV],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(el.score_vector(probs, valid)), [[1.8, 1.0, 0.8, 0.4]],
                             rtol=1e-6)
  # The last two queries only: sums (0.3, 0.5, 0.8, 0.4) over (2, 2, 2, 1) queries.
  last2 = el.score_vector(probs, valid, causal=True, queries_BxN=jnp.array([[0, 0, 1, 1]]))
  np.testing.assert_allclose(np.asarray(last2), [[0.15, 0.25, 0.4, 0.4]], rtol=1e-6)


def test_column_sums_equal_the_einsum_reference():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  probs = jax.random.uniform(k1, (2, 3, 4, 5))
  weights = (jax.random.uniform(k2, (2, 4)) > 0.4).astype(jnp.float32)
  want = np.einsum("bq,bhqs->bs", np.asarray(weights), np.asarray(probs)) / 3
  np.testing.assert_allclose(np.asarray(el.column_sums(probs, weights)), want, rtol=1e-6)
  assert el.column_sums(probs, weights).shape == (2, 5)


def test_causal_counts_by_hand_and_against_positions():
  queries = jnp.array([[1, 0, 1, 1, 0]], jnp.float32)
  valid = jnp.array([[1, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(np.asarray(el.causal_counts(queries, valid)), [[3, 2, 2, 1, 0]])
  # After elimination slots keep their original order: the count over positions is the same.
  valid = jnp.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
  pos = jnp.array([[0, 1, 4, 6, 7, 12], [2, 3, 5, 9, 9, 9]])
  queries = jnp.array([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], jnp.float32)
  sees = (pos[:, :, None] >= pos[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  want = np.sum(np.where(np.asarray(sees), np.asarray(queries)[:, :, None], 0.0), axis=1)
  got = np.asarray(el.causal_counts(queries, valid)) * np.asarray(valid)
  np.testing.assert_array_equal(got, want)


def test_finish_scores_divides_only_when_causal_and_zeroes_pads():
  colsum = jnp.array([[2.0, 1.0, 3.0, 4.0]])
  valid = jnp.array([[1, 1, 1, 0]], bool)
  np.testing.assert_allclose(np.asarray(el.finish_scores(colsum, valid)), [[2.0, 1.0, 3.0, 0.0]])
  np.testing.assert_allclose(np.asarray(el.finish_scores(colsum, valid, causal=True)),
                             [[2 / 3, 0.5, 3.0, 0.0]], rtol=1e-6)
  queries = jnp.array([[0, 1, 1, 0]], jnp.float32)   # counts (2, 2, 1): column 0 is seen twice
  np.testing.assert_allclose(np.asarray(el.finish_scores(colsum, valid, True, queries)),
                             [[1.0, 0.5, 3.0, 0.0]], rtol=1e-6)


# --- masks and protection levels -----------------------------------------------------------------

def test_last_queries_and_first_valid_with_left_and_right_padding():
  np.testing.assert_array_equal(np.asarray(el.last_queries(PADDED, 2)),
                                [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
  for window in (0, -1, 10):  # <= 0: every valid query; wider than the row: the same
    np.testing.assert_array_equal(np.asarray(el.last_queries(PADDED, window)), np.asarray(PADDED))
  np.testing.assert_array_equal(np.asarray(el.first_valid(PADDED, 2)),
                                [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
  assert not np.asarray(el.first_valid(PADDED, 0)).any()


def test_last_valid_and_first_token_masks():
  valid = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(el.last_valid_mask(valid)),
                                [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 1, 0, 0]])
  first = np.asarray(el.first_token_mask(valid))   # position 0, whatever the padding
  assert first.dtype == bool
  np.testing.assert_array_equal(first, [[1, 0, 0, 0, 0]] * 3)


def test_causal_protect_levels():
  levels = el.causal_protect(PADDED)
  assert levels.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(levels), [[0, 0, 0, 2, 0, 0], [0, 0, 0, 0, 0, 2]])
  np.testing.assert_array_equal(np.asarray(el.causal_protect(PADDED, sinks=1, recent=2)),
                                [[1, 0, 1, 2, 0, 0], [0, 0, 1, 0, 1, 2]])
  np.testing.assert_array_equal(np.asarray(el.causal_protect(PADDED, sinks=2)),
                                [[1, 1, 0, 2, 0, 0], [0, 0, 1, 1, 0, 2]])


def test_pool_scores_takes_the_neighbourhood_max_and_ignores_pads():
  sv = jnp.array([[0.1, 0.5, 0.2, 0.3, 9.0]])   # the pad's 9.0 must not spread
  valid = jnp.array([[1, 1, 1, 1, 0]], bool)
  np.testing.assert_allclose(np.asarray(el.pool_scores(sv, valid, 3)), [[0.5, 0.5, 0.5, 0.3, 0.0]])
  # An even kernel reaches one more to the right: (i, i + 1).
  np.testing.assert_allclose(np.asarray(el.pool_scores(sv, valid, 2)), [[0.5, 0.5, 0.3, 0.3, 0.0]])
  for kernel in (0, 1):
    assert el.pool_scores(sv, valid, kernel) is sv


# --- ACC -----------------------------------------------------------------------------------------

def test_masked_median_of_odd_and_even_counts():
  x = jnp.array([[3.0, 1.0, 2.0, 100.0, 7.0]] * 3)
  valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]], bool)
  np.testing.assert_allclose(np.asarray(el.masked_median(x, valid)), [2.0, 2.5, 7.0])


def test_acc_is_median_over_mean_of_the_valid_scores():
  sv = jnp.array([[1.0, 2.0, 6.0, 50.0], [1.25, 0.75, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
  valid = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_allclose(np.asarray(el.acc(sv, valid)), [2.0 / 3.0, 1.0, 0.0], rtol=1e-6)


# --- survivors: rankings, selection, gathering ---------------------------------------------------

def test_ranking_rules():
  valid, pos = jnp.ones((1, 4), bool), jnp.array([[0, 2, 5, 6]])
  sums = {"score": el.column_sums(_causal_probs(), valid.astype(jnp.float32))}
  rank = lambda rule, **kw: np.asarray(el.ranking(rule, sums, valid, pos, **kw))
  np.testing.assert_allclose(rank("score"), [[1.8, 1.0, 0.8, 0.4]], rtol=1e-6)
  np.testing.assert_allclose(rank("score", causal=True), [CAUSAL_SV], rtol=1e-6)
  np.testing.assert_allclose(rank("score", causal=True, pool=3), [[0.45, 0.45, 0.4, 0.4]],
                             rtol=1e-6)
  np.testing.assert_allclose(rank("first"), [[1.0, 1 / 3, 1 / 6, 1 / 7]], rtol=1e-6)
  np.testing.assert_allclose(rank("last", causal=True), [[1, 3, 6, 7]])
  rand = rank("random")
  assert rand.shape == (1, 4) and ((rand >= 1e-6) & (rand < 1.0)).all()  # positive: never a pad
  np.testing.assert_array_equal(rand, rank("random", rng=jax.random.PRNGKey(0)))  # None: key 0
  assert not np.array_equal(rand, rank("random", rng=jax.random.PRNGKey(1)))
  for rule, causal in (("window", False), ("last", False), ("best", True)):
    with pytest.raises(ValueError, match="survivor rule must be one of"):
      rank(rule, causal=causal)


def test_window_ranking_is_eq8_over_the_last_queries():
  valid, pos = jnp.ones((1, 4), bool), jnp.arange(4)[None]
  sums = {n: el.column_sums(_causal_probs(), w)
          for n, w in el.score_queries("window", valid, 2, False, True).items()}
  np.testing.assert_allclose(np.asarray(el.ranking("window", sums, valid, pos, causal=True, window=2)),
                             [[0.15, 0.25, 0.4, 0.4]], rtol=1e-6)


def test_select_indices_keeps_the_top_scores_in_ascending_order():
  sv = jnp.array([[0.1, 0.9, 0.5, 0.7, 0.3]])
  valid = jnp.ones((1, 5), bool)
  none = jnp.zeros((1, 5), bool)
  np.testing.assert_array_equal(np.asarray(el.select_indices(sv, valid, none, 3)), [[1, 2, 3]])
  np.testing.assert_array_equal(np.asarray(el.select_indices(sv, valid, none, 5)), [[0, 1, 2, 3, 4]])
  # [CLS] protected: it outranks every score, so one kept slot goes to it.
  cls = el.first_token_mask(valid)
  np.testing.assert_array_equal(np.asarray(el.select_indices(sv, valid, cls, 1)), [[0]])
  np.testing.assert_array_equal(np.asarray(el.select_indices(sv, valid, cls, 2)), [[0, 1]])


def test_select_indices_drops_pads_first_whatever_their_score():
  sv = jnp.array([[0.1, 0.2, 0.3, 9.0, 8.0], [0.0, 7.0, 0.0, 0.5, 0.4]])
  valid = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], bool)
  none = jnp.zeros((2, 5), bool)
  np.testing.assert_array_equal(np.asarray(el.select_indices(sv, valid, none, 3)),
                                [[0, 1, 2], [2, 3, 4]])
  np.testing.assert_array_equal(np.asarray(el.select_indices(sv, valid, none, 2)),
                                [[1, 2], [3, 4]])


def test_select_indices_level_two_beats_level_one_when_keeping_fewer():
  sv = jnp.array([[0.0, 8.0, 0.0, 0.0, 9.0]])
  valid = jnp.ones((1, 5), bool)
  levels = jnp.array([[1, 0, 1, 2, 0]], jnp.int8)   # a sink, a recent token, the last token
  kept = [np.asarray(el.select_indices(sv, valid, levels, n))[0].tolist() for n in (1, 2, 3, 4)]
  # The last token, then the earlier level-1 token, then the other one, then the best score.
  assert kept == [[3], [0, 3], [0, 2, 3], [0, 2, 3, 4]]


def test_gather_and_onehot_select_the_same_rows():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3))
  idx = jnp.array([[0, 2, 5], [1, 3, 4]])
  want = np.asarray(x)[np.arange(2)[:, None], np.asarray(idx)]
  np.testing.assert_array_equal(np.asarray(el.gather(x, idx)), want)
  np.testing.assert_allclose(np.asarray(el.gather(x, idx, "onehot")), want, rtol=1e-6, atol=1e-7)
  # Integer and boolean arrays always take the gather (a one-hot matmul would make them float).
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  for carried in (pos, pos % 2 == 0):
    out = el.gather(carried, idx, "onehot")
    assert out.dtype == carried.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(carried)[np.arange(2)[:, None], np.asarray(idx)])


def test_eliminate_gathers_every_carried_array_at_the_selected_positions():
  sv = jnp.array([[0.2, 0.1, 0.9, 0.4, 0.0]])
  valid = jnp.array([[1, 1, 1, 1, 0]], bool)
  x = jnp.arange(10.0).reshape(1, 5, 2)
  pos = jnp.array([[0, 2, 3, 7, 8]])
  for method in ("gather", "onehot"):
    idx, x_kept, pos_kept = el.eliminate(sv, valid, el.first_token_mask(valid), 3, x, pos,
                                         method=method)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 2, 3]])
    np.testing.assert_allclose(np.asarray(x_kept), [[[0.0, 1.0], [4.0, 5.0], [6.0, 7.0]]])
    np.testing.assert_array_equal(np.asarray(pos_kept), [[0, 3, 7]])


# --- causal layers -------------------------------------------------------------------------------

def test_check_causal_rule_names_the_bad_field():
  for rule in el.CAUSAL_RULES:
    el.check_causal_rule(rule, 1, 0, 0, 0)
  for args, match in ((("best", 0, 0, 0), "survivors must be one of"),
                      (("score", -1, 0, 0), "score_window must be an int >= 0"),
                      (("score", 0, 1.5, 0), "keep_sinks must be an int >= 0"),
                      (("score", 0, 0, "2"), "keep_recent must be an int >= 0"),
                      (("score", 0, 0, 0, -1), "score_pool must be an int >= 0"),
                      (("window", 0, 0, 0), "score_window >= 1")):
    with pytest.raises(ValueError, match=match):
      el.check_causal_rule(*args)


def test_score_queries_asks_only_for_the_sums_the_layer_needs():
  valid = PADDED
  assert el.score_queries("score", valid, 0, with_scores=False, eliminating=False) == {}
  assert el.score_queries("first", valid, 0, with_scores=False, eliminating=True) == {}
  assert set(el.score_queries("score", valid, 0, False, True)) == {"score"}
  both = el.score_queries("window", valid, 2, with_scores=True, eliminating=True)
  assert set(both) == {"score", "window"}
  np.testing.assert_array_equal(np.asarray(both["score"]), np.asarray(valid, np.float32))
  np.testing.assert_array_equal(np.asarray(both["window"]),
                                [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])


@pytest.mark.parametrize("rule, n_keep, kept", [
    ("score", 4, [0, 1, 2, 3]),   # keeping every token eliminates nothing
    ("score", 2, [0, 3]),         # the last token (protected), then the best eq. 8 score (0.45)
    ("score", 3, [0, 2, 3]),      # 0.4 at slot 2 beats 1/3 at slot 1
    ("last", 2, [2, 3]),
    ("first", 2, [0, 3]),
])
def test_a_causal_layer_keeps_the_ranked_survivors_and_gathers_every_carried_array(rule, n_keep, kept):
  """What the stack does between attention and feed-forward: rank, protect, select, gather."""
  valid = jnp.ones((1, 4), bool)
  carry = {"valid": valid, "positions": jnp.arange(4)[None] * 10,
           "protect": el.causal_protect(valid), "extra": jnp.arange(4)[None] + 100}
  x = jnp.arange(8.0).reshape(1, 4, 2)
  sums = {"score": el.column_sums(_causal_probs(), valid.astype(jnp.float32))}
  rank = el.ranking(rule, sums, valid, carry["positions"], causal=True)
  names = sorted(carry)
  idx, x_out, *out = el.eliminate(rank, valid, carry["protect"], n_keep, x,
                                  *(carry[n] for n in names))
  np.testing.assert_array_equal(np.asarray(idx), [kept])
  np.testing.assert_array_equal(np.asarray(x_out), np.asarray(x)[:, kept])
  for name, got in zip(names, out):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(carry[name])[:, kept], name)


# --- the same functions on larger random and uniform cases ------------------------------------

def test_acc_is_one_for_uniform_attention():
  n, valid_len = 10, 7
  valid = (np.arange(n) < valid_len)[None]
  probs = np.where(valid[:, None, None, :], 1.0 / valid_len, 0.0) * np.ones((1, 3, n, n))
  sv = el.score_vector(jnp.asarray(probs, jnp.float32), jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(sv)[0, :valid_len], 1.0, rtol=1e-6)
  assert float(el.acc(sv, jnp.asarray(valid))[0]) == pytest.approx(1.0, abs=1e-6)
  assert (np.asarray(sv)[0, valid_len:] == 0).all()  # pads score 0


def test_causal_score_normalisation():
  # Uniform causal attention: query i spreads 1/(i+1) over keys 0..i.
  n = 6
  probs = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
  valid = np.ones((1, n), bool)
  sv = el.score_vector(jnp.asarray(probs[None, None], jnp.float32), jnp.asarray(valid),
                       causal=True)
  raw = probs.sum(0)
  np.testing.assert_allclose(np.asarray(sv)[0], raw / (n - np.arange(n)), rtol=1e-6)


def test_onehot_selection_equals_gather():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 5))
  idx = jnp.array([[0, 3, 4], [1, 2, 8]])
  np.testing.assert_allclose(np.asarray(el.gather(x, idx, "onehot")),
                             np.asarray(el.gather(x, idx)), atol=1e-6)


def _sums(probs, valid, window):
  """The column sums the attention accumulates for the window rule (``score_queries``)."""
  queries = el.score_queries("window", valid, window, False, True)
  return {n: el.column_sums(probs, w) for n, w in queries.items()}


def test_window_scores_only_the_last_queries():
  """Pure function: eq. 8 over the last w valid queries, with left and right padding."""
  probs = jax.random.uniform(jax.random.PRNGKey(0), (2, 2, 6, 6))
  probs = jnp.tril(probs)
  valid = jnp.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  got = np.asarray(el.ranking("window", _sums(probs, valid, 2), valid, pos, causal=True,
                              window=2))
  attn = np.asarray(probs).mean(1)
  for row, queries in ((0, [2, 3]), (1, [4, 5])):
    for j in range(6):
      seen = [q for q in queries if q >= j]
      want = attn[row, seen, j].sum() / max(len(seen), 1) if valid[row, j] else 0.0
      assert got[row, j] == pytest.approx(want, rel=1e-5), (row, j)
  levels = np.asarray(el.causal_protect(valid, sinks=1, recent=2))
  np.testing.assert_array_equal(levels, [[1, 0, 1, 2, 0, 0], [0, 1, 0, 0, 1, 2]])


def test_pooled_scores_keep_the_neighbours_of_a_high_score():
  """Pure function: max over the ``kernel`` nearest tokens, pads neither give nor get a score."""
  sv = jnp.array([[0.1, 0.2, 0.9, 0.3, 0.05, 0.0], [0.0, 0.4, 0.1, 0.2, 0.3, 0.5]])
  valid = jnp.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)
  got = np.asarray(el.pool_scores(sv, valid, 3))
  np.testing.assert_allclose(got, [[0.2, 0.9, 0.9, 0.9, 0.3, 0.0], [0.0, 0.4, 0.4, 0.3, 0.5, 0.5]])
  np.testing.assert_array_equal(el.pool_scores(sv, valid, 1), sv)
  # Through the rule: token 2's neighbours now outrank token 5, which drew more attention.
  probs = jnp.zeros((1, 1, 6, 6)).at[0, 0, 5, 2].set(0.9).at[0, 0, 5, 4].set(0.1)
  probs = probs + jnp.tril(jnp.full((6, 6), 1e-3))
  pos, ok = jnp.arange(6)[None], jnp.ones((1, 6), bool)
  plain = np.asarray(el.ranking("window", _sums(probs, ok, 1), ok, pos, causal=True,
                                window=1))
  pooled = np.asarray(el.ranking("window", _sums(probs, ok, 1), ok, pos, causal=True,
                                 window=1, pool=3))
  assert plain[0, 4] > plain[0, 1] and pooled[0, 1] == pooled[0, 3] == pooled[0, 2]
  assert pooled[0, 1] > pooled[0, 4]


def test_causal_counts_follow_positions():
  """Eq. 8's divisor from slots equals the count over original positions, after elimination too."""
  valid = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], bool)
  pos = jnp.array([[0, 0, 2, 5, 6, 9, 11], [1, 3, 4, 8, 10, 10, 10]])
  queries = el.last_queries(valid, 3).astype(jnp.float32)
  sees = (pos[:, :, None] >= pos[:, None, :]) & valid[:, :, None]
  want = jnp.sum(jnp.where(sees, queries[:, :, None], 0.0), axis=1)
  np.testing.assert_allclose(np.asarray(el.causal_counts(queries, valid) * valid),
                             np.asarray(want * valid))
