"""models/generate.py: prefill with elimination, then KV-cache decoding (issues 5, 16, 40).

Greedy tokens equal HF's ``generate`` for GPT-2 and Llama; on tiny models the
cached decode equals a full forward per step over padded rows, each layer's
cache holds the previous layer's survivors plus the new tokens, and the first
new token is the eliminating forward's argmax. T5 goes through the same entry.
"""

import jax
import numpy as np
import pytest

from decoder_fixtures import (GPT2_VOCAB, LLAMA_VOCAB, N_LAYER, TINY_VOCAB, generate_without_cache,
                              hf_gpt2, hf_greedy, hf_llama, right_padded, tiny)
from latadj_jax import models
from latadj_jax.models import Batch
from latadj_jax.models import generate as gen


@pytest.fixture(scope="module")
def hf_pairs(tmp_path_factory):
  """Returns a loader of {variant: (torch model, our Pretrained)}, each built once."""
  cache = {}

  def load(variant):
    if variant not in cache:
      path = tmp_path_factory.mktemp(variant)
      hf = hf_gpt2(path) if variant == "gpt2" else hf_llama(variant, path)
      cache[variant] = hf, models.from_pretrained(str(path))
    return cache[variant]
  return load


@pytest.mark.parametrize("variant, vocab",
                         [("gpt2", GPT2_VOCAB), ("llama_gqa_untied", LLAMA_VOCAB)],
                         ids=["gpt2", "llama"])
def test_greedy_generation_matches_hf(hf_pairs, variant, vocab):
  hf, pre = hf_pairs(variant)
  ids = np.random.default_rng(1).integers(0, vocab, size=(2, 10)).astype(np.int32)
  ours = np.asarray(gen.generate(pre.model, pre.params, ids, max_new_tokens=32)["tokens"])
  ref = hf_greedy(hf, ids, 32)
  print("greedy tokens row 0:", ours[0].tolist())
  assert len(set(ref[0].tolist())) > 5, "degenerate reference: the test would be weak"
  np.testing.assert_array_equal(ours, ref)


def test_kv_cache_generation_gpt2():
  model, params = tiny("gpt2")
  N, T, lengths = 10, 12, [10, 6]
  ids, mask = right_padded(lengths, N, TINY_VOCAB, seed=4)
  cached = gen.generate(model, params, ids, mask, max_new_tokens=T)
  assert [c["k"].shape[1] for c in cached["caches"]] == [N + T] * N_LAYER
  expected = generate_without_cache(model, params, ids, lengths, T)
  assert len(set(expected[0].tolist())) > 3, "degenerate reference: the test would be weak"
  np.testing.assert_array_equal(np.asarray(cached["tokens"]), expected)

  counts = (7, 5, 3)
  elim = gen.generate(model, params, ids, mask, max_new_tokens=T, keep_counts=counts)
  sizes = [(c["k"].shape[1], c["v"].shape[1], c["valid"].shape[1]) for c in elim["caches"]]
  assert sizes == [(n + T,) * 3 for n in (N,) + counts[:-1]]
  # Every new token is valid in every layer's cache after decoding (all but the last slot).
  for c in elim["caches"]:
    assert np.asarray(c["valid"])[:, -T:-1].all() and not np.asarray(c["valid"])[:, -1].any()
  # The first new token is the argmax of the eliminating forward at the last valid token.
  out = jax.jit(lambda i, m: model.apply(params, Batch(i, m), counts))(ids, mask)
  pos = np.asarray(out.positions)
  first = [np.asarray(out.logits)[r, list(pos[r]).index(lengths[r] - 1)].argmax()
           for r in range(2)]
  np.testing.assert_array_equal(np.asarray(elim["tokens"])[:, 0], first)


def test_kv_cache_padded_rows_and_sizes_follow_keep_counts_llama():
  model, params = tiny("llama")
  N, T, lengths = 10, 12, [10, 6]
  ids = np.random.default_rng(4).integers(0, TINY_VOCAB, (2, N)).astype(np.int32)
  mask = (np.arange(N)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  cached = gen.generate(model, params, ids, mask, max_new_tokens=T)
  expected = generate_without_cache(model, params, ids, lengths, T)
  assert len(set(expected[1].tolist())) > 3, "degenerate reference: the test would be weak"
  np.testing.assert_array_equal(np.asarray(cached["tokens"]), expected)

  counts = (7, 5, 3)
  elim = gen.generate(model, params, ids, mask, max_new_tokens=T, keep_counts=counts)
  assert [c["k"].shape for c in elim["caches"]] == [(2, n + T, 2, 8) for n in (N,) + counts[:-1]]
  for c in elim["caches"]:
    assert np.asarray(c["valid"])[:, -T:-1].all() and not np.asarray(c["valid"])[:, -1].any()
  out = model.apply(params, Batch(ids, mask), counts)
  pos = np.asarray(out.positions)
  first = [np.asarray(out.logits)[r, list(pos[r]).index(lengths[r] - 1)].argmax() for r in range(2)]
  np.testing.assert_array_equal(np.asarray(elim["tokens"])[:, 0], first)


def test_prefill_then_decode_is_generate():
  """The two jitted halves (time to first token, then the decode loop) compose into ``generate``;
  the prefill's state starts each row after its last valid original position."""
  model, params = tiny("llama")
  N, T, lengths, counts = 10, 6, [10, 7], (8, 6, 4)
  ids, mask = right_padded(lengths, N, TINY_VOCAB, seed=11)
  rng = jax.random.PRNGKey(0)
  want = gen.generate(model, params, ids, mask, max_new_tokens=T, keep_counts=counts)
  first, state = gen.prefill_fn(model, counts, T)(params, ids, mask, jax.random.split(rng)[1])
  np.testing.assert_array_equal(np.asarray(state["pos_B"]), lengths)
  np.testing.assert_array_equal(np.asarray(state["pos_id_B"]), lengths)
  tokens, _ = gen.decode_fn(model, T)(params, first, state, jax.random.split(rng)[0])
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want["tokens"]))
  # The prefill's logits are the full forward's at each row's last valid token.
  logits_BxV, out = jax.jit(lambda p: model.method("prefill", p, Batch(ids, mask), counts))(params)
  full = model.apply(params, Batch(ids, mask), counts)
  last = np.asarray(out.positions) == (np.asarray(lengths) - 1)[:, None]
  np.testing.assert_allclose(np.asarray(logits_BxV), np.asarray(full.logits)[last], atol=1e-5)
  with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
    gen.generate(model, params, ids, mask, max_new_tokens=60)


def test_generate_dispatches_t5_to_its_encoder_decoder_loop():
  from latadj_jax.models import t5_generate
  model = models.build({"model_type": "t5", "vocab_size": 40, "d_model": 16, "d_kv": 4,
                        "d_ff": 32, "num_layers": 2, "num_heads": 4})
  params = model.init(0)
  ids, mask = right_padded([9, 5], 9, 40, seed=12)
  out = gen.generate(model, params, ids, mask, max_new_tokens=5, keep_counts=(7, 5))
  ref = t5_generate.generate(model, params, ids, mask, max_new_tokens=5, keep_counts=(7, 5))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(ref["tokens"]))
  assert out["encoder"].last_hidden_state.shape == (2, 5, 16)


def test_select_token_greedy_and_top_k():
  logits_BxV = jax.random.normal(jax.random.PRNGKey(0), (64, 20))
  greedy = np.asarray(gen.select_token(logits_BxV, None))
  np.testing.assert_array_equal(greedy, np.asarray(logits_BxV).argmax(-1))
  # Top-1 sampling is greedy, whatever the temperature.
  top1 = gen.select_token(logits_BxV, jax.random.PRNGKey(1), temperature=5.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  top3_BxK = np.argsort(-np.asarray(logits_BxV), axis=-1)[:, :3]
  draws = np.stack([np.asarray(gen.select_token(logits_BxV, jax.random.PRNGKey(s), 2.0, 3))
                    for s in range(8)], axis=1)
  assert all(set(d) <= set(t) for d, t in zip(draws, top3_BxK)), "sampled outside the top k"
  assert (draws != greedy[:, None]).any(), "temperature sampling never left the argmax"
