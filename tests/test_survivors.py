"""Causal survivor rules (issue 24): score, window, first, random, last, with sinks and a recent window.

Tiny random GPT-2 and Llama models: every rule keeps exactly the keep counts,
the protected tokens survive, ``window`` over every query is ``score``, and the
KV cache of each layer holds the previous layer's survivors only. (RoPE at the
original positions, for every rule: ``test_llama.py``.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latadj_jax.core import elimination
from latadj_jax.models import gpt2, llama

N, COUNTS = 14, (11, 8, 6)
CONFIGS = {
    "gpt2": (gpt2.GPT2LMHeadModel, gpt2.GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=3,
                                                   n_head=2, initializer_range=0.3)),
    "llama": (llama.LlamaForCausalLM, llama.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.3)),
}
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


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
  """Returns (build(**rule) -> module, params): the parameters do not depend on the rule."""
  cls, cfg = CONFIGS[request.param]
  build = lambda **rule: cls(dataclasses.replace(cfg, **rule))
  params = jax.jit(build().init)(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
  return build, params


def _batch():
  """A full row, a right-padded row (10 valid) and a left-padded row (first 3 are pads)."""
  ids = np.random.default_rng(7).integers(0, 50, (3, N)).astype(np.int32)
  mask = np.ones((3, N), np.int32)
  mask[1, 10:] = 0
  mask[2, :3] = 0
  return ids, mask


def _run(module, params, ids, mask, counts=COUNTS):
  fn = jax.jit(lambda i, m: module.apply({"params": params}, i, m, keep_counts=counts,
                                         method=type(module).prefill))
  return fn(ids, mask)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_keeps_the_counts_and_the_protected(family, rule):
  build, params = family
  spec = RULES[rule]
  ids, mask = _batch()
  _, out = _run(build(**spec), params, ids, mask)
  valid_rows = [np.flatnonzero(m) for m in mask]
  for layer, (n, pos) in enumerate(zip(COUNTS, out["layer_positions"])):
    pos = np.asarray(pos)
    assert pos.shape == (3, n), layer
    assert (np.diff(pos, axis=1) > 0).all(), "kept positions must stay ascending"
    for row, valid in enumerate(valid_rows):
      must = {valid[-1]} | set(valid[:spec.get("keep_sinks", 0)])
      if spec.get("keep_recent", 0):
        must |= set(valid[-spec["keep_recent"]:])
      assert must <= set(pos[row].tolist()), f"layer {layer + 1}, row {row}: lost {must - set(pos[row])}"
  # The KV cache of layer l + 1 holds exactly layer l's survivors, at their original positions.
  for layer, kv in enumerate(out["kv"][1:]):
    np.testing.assert_array_equal(np.asarray(kv["positions"]), np.asarray(out["layer_positions"][layer]))
    assert kv["k"].shape[1] == COUNTS[layer]


def test_first_keeps_the_earliest_tokens(family):
  build, params = family
  ids = np.random.default_rng(1).integers(0, 50, (1, N)).astype(np.int32)
  _, out = _run(build(survivors="first"), params, ids, np.ones_like(ids))
  for n, pos in zip(COUNTS, out["layer_positions"]):
    assert np.asarray(pos)[0].tolist() == list(range(n - 1)) + [N - 1]


def test_last_keeps_the_sinks_and_the_most_recent_tokens(family):
  build, params = family
  ids = np.random.default_rng(1).integers(0, 50, (1, N)).astype(np.int32)
  _, out = _run(build(survivors="last", keep_sinks=2), params, ids, np.ones_like(ids))
  for n, pos in zip(COUNTS, out["layer_positions"]):
    assert np.asarray(pos)[0].tolist() == [0, 1] + list(range(N - n + 2, N))


def test_window_over_every_query_is_score(family):
  build, params = family
  ids, mask = _batch()
  logits, ref = _run(build(survivors="score"), params, ids, mask)
  wide_logits, wide = _run(build(survivors="window", score_window=N), params, ids, mask)
  for a, b in zip(wide["layer_positions"], ref["layer_positions"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(wide_logits), np.asarray(logits))
  _, narrow = _run(build(survivors="window", score_window=2), params, ids, mask)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(narrow["layer_positions"], ref["layer_positions"])), \
      "a 2-query window chose the same tokens as eq. 8 everywhere: the test cannot tell them apart"


def test_more_protected_than_kept_still_keeps_the_last_token(family):
  build, params = family
  ids, mask = _batch()
  counts = (6, 4, 2)
  _, out = _run(build(keep_sinks=4, keep_recent=4), params, ids, mask, counts)
  for pos in out["layer_positions"]:
    for row, m in enumerate(mask):
      assert np.flatnonzero(m)[-1] in np.asarray(pos)[row]


def _sums(probs, valid, window):
  """The column sums the attention accumulates for the window rule (``score_queries``)."""
  queries = elimination.score_queries("window", valid, window, False, True)
  return {n: elimination.column_sums(probs, w) for n, w in queries.items()}


def test_window_scores_only_the_last_queries():
  """Pure function: eq. 8 over the last w valid queries, with left and right padding."""
  probs = jax.random.uniform(jax.random.PRNGKey(0), (2, 2, 6, 6))
  probs = jnp.tril(probs)
  valid = jnp.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  got = np.asarray(elimination.causal_ranking("window", _sums(probs, valid, 2), valid, pos, window=2))
  attn = np.asarray(probs).mean(1)
  for row, queries in ((0, [2, 3]), (1, [4, 5])):
    for j in range(6):
      seen = [q for q in queries if q >= j]
      want = attn[row, seen, j].sum() / max(len(seen), 1) if valid[row, j] else 0.0
      assert got[row, j] == pytest.approx(want, rel=1e-5), (row, j)
  levels = np.asarray(elimination.causal_protect(valid, sinks=1, recent=2))
  np.testing.assert_array_equal(levels, [[1, 0, 1, 2, 0, 0], [0, 1, 0, 0, 1, 2]])


def test_pooled_scores_keep_the_neighbours_of_a_high_score():
  """Pure function: max over the ``kernel`` nearest tokens, pads neither give nor get a score."""
  sv = jnp.array([[0.1, 0.2, 0.9, 0.3, 0.05, 0.0], [0.0, 0.4, 0.1, 0.2, 0.3, 0.5]])
  valid = jnp.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)
  got = np.asarray(elimination.pool_scores(sv, valid, 3))
  np.testing.assert_allclose(got, [[0.2, 0.9, 0.9, 0.9, 0.3, 0.0], [0.0, 0.4, 0.4, 0.3, 0.5, 0.5]])
  np.testing.assert_array_equal(elimination.pool_scores(sv, valid, 1), sv)
  # Through the rule: token 2's neighbours now outrank token 5, which drew more attention.
  probs = jnp.zeros((1, 1, 6, 6)).at[0, 0, 5, 2].set(0.9).at[0, 0, 5, 4].set(0.1)
  probs = probs + jnp.tril(jnp.full((6, 6), 1e-3))
  pos, ok = jnp.arange(6)[None], jnp.ones((1, 6), bool)
  plain = np.asarray(elimination.causal_ranking("window", _sums(probs, ok, 1), ok, pos, window=1))
  pooled = np.asarray(elimination.causal_ranking("window", _sums(probs, ok, 1), ok, pos, window=1,
                                                  pool=3))
  assert plain[0, 4] > plain[0, 1] and pooled[0, 1] == pooled[0, 3] == pooled[0, 2]
  assert pooled[0, 1] > pooled[0, 4]


def test_rule_names_parse_to_config_fields():
  from latadj_jax.tasks import continuation
  assert continuation.rule_overrides("window8_s32_r64_p7") == dict(
      survivors="window", score_window=8, keep_sinks=32, keep_recent=64, score_pool=7)
  assert continuation.rule_overrides("last_s4") == dict(survivors="last", keep_sinks=4)
  with pytest.raises(ValueError, match="_p<pool>"):
    continuation.rule_overrides("window8_q3")


@pytest.mark.parametrize("bad, match", [
    (dict(survivors="best"), "survivors must be one of"),
    (dict(survivors="window", score_window=0), "score_window >= 1"),
    (dict(keep_sinks=-1), "keep_sinks must be an int >= 0"),
    (dict(keep_recent=2.5), "keep_recent must be an int >= 0"),
    (dict(score_pool=-3), "score_pool must be an int >= 0"),
])
def test_bad_rule_settings_name_the_field(bad, match):
  for _, cfg in CONFIGS.values():
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(cfg, **bad)


def test_passkey_prompts_have_the_exact_length_and_the_key_at_its_depth():
  from latadj_jax.data import text
  from latadj_jax.tasks import passkey
  tok = text.byte_tokenizer()
  p = passkey.make(tok, 900, [0.0, 0.5, 1.0], seed=3)
  assert p.input_ids.shape == (3, 900)
  assert len(set(p.keys)) == 3
  for ids, key, at, depth in zip(p.input_ids, p.keys, p.needle_positions, p.depths):
    prompt = tok.decode(ids.tolist())
    assert prompt.startswith(passkey.INTRO) and prompt.endswith(passkey.QUESTION)
    assert tok.decode(ids[at:].tolist()).startswith(passkey.NEEDLE.format(key=key))
  intro, question = (len(tok(s, add_special_tokens=False)["input_ids"])
                     for s in (passkey.INTRO, passkey.QUESTION))
  needle = len(tok(passkey.NEEDLE.format(key=p.keys[2]), add_special_tokens=False)["input_ids"])
  # Depth 0: right after the introduction; 1: right before the question; 0.5: mid-filler.
  assert p.needle_positions[0] == intro and p.needle_positions[2] == 900 - question - needle
  assert p.needle_lengths[2] == needle
  room = 900 - intro - question - needle
  unit = len(tok(passkey.FILLER, add_special_tokens=False)["input_ids"])
  assert abs(p.needle_positions[1] - intro - 0.5 * room) <= unit / 2
  with pytest.raises(ValueError, match="no room for filler"):
    passkey.make(tok, 200, [0.5])
  assert passkey.retrieved(" 52817. Remember", "52817")
  assert not passkey.retrieved(" 5281 or 52817", "52817") and not passkey.retrieved(" none", "1")
  assert passkey.exact_match([" 12345.", " 99"], ["12345", "54321"]) == 0.5
