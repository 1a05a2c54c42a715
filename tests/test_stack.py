"""models/stack.py: the one eliminating loop, and the survivor rules it applies (issues 24, 40).

``stack.run`` alone on hand-made layers gathers every carried array with the
same indices; then tiny random GPT-2 and Llama models under each causal rule
(score, window, first, random, last, with sinks and a recent window): every
rule keeps exactly the keep counts, the protected tokens survive, ``window``
over every query is ``score``, and the KV cache of each layer holds the
previous layer's survivors only. (RoPE at the original positions, for every
rule: ``test_decoder.py``.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_fixtures import TINY_VOCAB, tiny
from latadj_jax.core import elimination
from latadj_jax.models import Batch, Options, interface, stack

N, COUNTS = 14, (11, 8, 6)
RULES = {
    "score": dict(survivors="score"),
    "window4": dict(survivors="window", score_window=4),
    "first": dict(survivors="first"),
    "random": dict(survivors="random"),
    "last_sinks2": dict(survivors="last", keep_sinks=2),
    "window3_sinks2_recent3": dict(survivors="window", score_window=3, keep_sinks=2, keep_recent=3),
    "score_sinks2_recent3": dict(survivors="score", keep_sinks=2, keep_recent=3),
    "window4_sinks1_pool3": dict(survivors="window", score_window=4, keep_sinks=1, score_pool=3),
}


class _Layer:
  """A stand-in layer: attention that reads one fixed key per query, a finish that adds 1."""

  def __init__(self, favourite_N):
    self.favourite_N = favourite_N  # every query attends to this original position only

  def attend(self, h_BxNxD, carry, queries, deterministic):
    pos = carry["positions"]
    probs_Bx1xNxN = (pos[:, None, None, :] == jnp.asarray(self.favourite_N)).astype(jnp.float32)
    probs_Bx1xNxN = jnp.broadcast_to(probs_Bx1xNxN, pos.shape[:1] + (1,) + pos.shape[1:] * 2)
    sums = {n: elimination.column_sums(probs_Bx1xNxN, w) for n, w in queries.items()}
    return h_BxNxD * 10, sums, {"positions": pos}

  def finish(self, h_BxKxD, ctx_BxKxD, deterministic):
    return h_BxKxD + ctx_BxKxD + 1


def test_run_gathers_every_carried_array_with_the_same_indices():
  B, N_, D = 2, 6, 3
  valid = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
  h = jnp.broadcast_to(jnp.arange(N_, dtype=jnp.float32)[None, :, None], (B, N_, D))
  tag = jnp.broadcast_to(100 + jnp.arange(N_), (B, N_))
  carry = interface.start_carry(valid, elimination.first_token_mask(valid), tag=tag)
  layers = [_Layer(3), _Layer(2)]
  out, kept, aux = stack.run(layers, h, carry, (4, 2), stack.Survivors("score"),
                             Options(scores=True, kv=True, hidden=True))
  # Layer 1 keeps [CLS] (protected), the favourite 3 and the next best ties in original order.
  pos1, pos2 = (np.asarray(p) for p in aux["positions"])
  assert pos1.shape == (B, 4) and pos2.shape == (B, 2)
  assert all(3 in row and row[0] == 0 for row in pos1)
  assert pos2.tolist() == [[0, 2], [0, 2]]
  # Everything travels together: the tag, validity, and the states (h' = 11 h + 1 per layer).
  np.testing.assert_array_equal(np.asarray(kept["tag"]), 100 + pos2)
  np.testing.assert_array_equal(np.asarray(kept["positions"]), pos2)
  np.testing.assert_array_equal(np.asarray(out)[..., 0], 11 * (11 * pos2 + 1) + 1)
  assert [np.asarray(kv["positions"]).shape[1] for kv in aux["kv"]] == [N_, 4]
  assert len(aux["hidden"]) == 3 and len(aux["scores"]) == len(aux["acc"]) == 2
  # Keeping everything runs the same layers and gathers nothing.
  same, carry_same, _ = stack.run(layers, h, carry, (N_, N_), stack.Survivors("score"), Options())
  np.testing.assert_array_equal(np.asarray(same)[..., 0],
                                np.tile(11 * (11 * np.arange(N_) + 1) + 1, (B, 1)))
  np.testing.assert_array_equal(np.asarray(carry_same["tag"]), np.asarray(tag))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request):
  """Returns (build(**rule) -> Model, params): the parameters do not depend on the rule."""
  model, params = tiny(request.param)
  return (lambda **rule: model.replace(**rule)), params


def _batch():
  """A full row, a right-padded row (10 valid) and a left-padded row (first 3 are pads)."""
  ids = np.random.default_rng(7).integers(0, TINY_VOCAB, (3, N)).astype(np.int32)
  mask = np.ones((3, N), np.int32)
  mask[1, 10:] = 0
  mask[2, :3] = 0
  return ids, mask


def _run(model, params, ids, mask, counts=COUNTS):
  fn = jax.jit(lambda i, m: model.method("prefill", params, Batch(i, m), counts))
  return fn(ids, mask)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_keeps_the_counts_and_the_protected(family, rule):
  build, params = family
  spec = RULES[rule]
  ids, mask = _batch()
  _, out = _run(build(**spec), params, ids, mask)
  valid_rows = [np.flatnonzero(m) for m in mask]
  for layer, (n, pos) in enumerate(zip(COUNTS, out.layer_positions)):
    pos = np.asarray(pos)
    assert pos.shape == (3, n), layer
    assert (np.diff(pos, axis=1) > 0).all(), "kept positions must stay ascending"
    for row, valid in enumerate(valid_rows):
      must = {valid[-1]} | set(valid[:spec.get("keep_sinks", 0)])
      if spec.get("keep_recent", 0):
        must |= set(valid[-spec["keep_recent"]:])
      assert must <= set(pos[row].tolist()), f"layer {layer + 1}, row {row}: lost {must - set(pos[row])}"
  # The KV cache of layer l + 1 holds exactly layer l's survivors, at their original positions.
  for layer, kv in enumerate(out.kv[1:]):
    np.testing.assert_array_equal(np.asarray(kv["positions"]), np.asarray(out.layer_positions[layer]))
    assert kv["k"].shape[1] == COUNTS[layer]


def test_first_keeps_the_earliest_tokens(family):
  build, params = family
  ids = np.random.default_rng(1).integers(0, TINY_VOCAB, (1, N)).astype(np.int32)
  _, out = _run(build(survivors="first"), params, ids, np.ones_like(ids))
  for n, pos in zip(COUNTS, out.layer_positions):
    assert np.asarray(pos)[0].tolist() == list(range(n - 1)) + [N - 1]


def test_last_keeps_the_sinks_and_the_most_recent_tokens(family):
  build, params = family
  ids = np.random.default_rng(1).integers(0, TINY_VOCAB, (1, N)).astype(np.int32)
  _, out = _run(build(survivors="last", keep_sinks=2), params, ids, np.ones_like(ids))
  for n, pos in zip(COUNTS, out.layer_positions):
    assert np.asarray(pos)[0].tolist() == [0, 1] + list(range(N - n + 2, N))


def test_window_over_every_query_is_score(family):
  build, params = family
  ids, mask = _batch()
  logits, ref = _run(build(survivors="score"), params, ids, mask)
  wide_logits, wide = _run(build(survivors="window", score_window=N), params, ids, mask)
  for a, b in zip(wide.layer_positions, ref.layer_positions):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(wide_logits), np.asarray(logits))
  _, narrow = _run(build(survivors="window", score_window=2), params, ids, mask)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(narrow.layer_positions, ref.layer_positions)), \
      "a 2-query window chose the same tokens as eq. 8 everywhere: the test cannot tell them apart"


def test_more_protected_than_kept_still_keeps_the_last_token(family):
  build, params = family
  ids, mask = _batch()
  counts = (6, 4, 2)
  _, out = _run(build(keep_sinks=4, keep_recent=4), params, ids, mask, counts)
  for pos in out.layer_positions:
    for row, m in enumerate(mask):
      assert np.flatnonzero(m)[-1] in np.asarray(pos)[row]


@pytest.mark.parametrize("bad, match", [
    (dict(survivors="best"), "survivors must be one of"),
    (dict(survivors="window", score_window=0), "score_window >= 1"),
    (dict(keep_sinks=-1), "keep_sinks must be an int >= 0"),
    (dict(keep_recent=2.5), "keep_recent must be an int >= 0"),
    (dict(score_pool=-3), "score_pool must be an int >= 0"),
])
def test_bad_rule_settings_name_the_field(bad, match):
  for variant in ("gpt2", "llama"):
    model, _ = tiny(variant)
    with pytest.raises(ValueError, match=match):
      model.replace(**bad)
