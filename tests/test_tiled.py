"""Attention over query blocks (issue 25): the same context and score-vector sums as the whole N x N."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latadj_jax.core import elimination
from latadj_jax.models import attention


def _qkv(B=2, N=12, H=3, K=4, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (B, N, H, K)) for k in keys)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [1, 4, 12])
def test_query_blocks_equal_the_whole_attention(causal, block):
  q, k, v = _qkv()
  B, N = q.shape[:2]
  valid = jnp.array([[1] * N, [0, 0, 0] + [1] * (N - 3)], bool)  # one left-padded row
  pos = jnp.broadcast_to(jnp.arange(N), (B, N))
  allowed_BxQxS = jnp.broadcast_to(
      valid[:, None, :] & (pos[:, :, None] >= pos[:, None, :] if causal else True), (B, N, N))

  def probs(q_rows, allowed):
    logits = attention.logits(q_rows, k) + jnp.where(allowed[:, None], 0.0, -1e30)
    return jnp.where(allowed[:, None], jax.nn.softmax(logits, axis=-1), 0.0)

  whole = probs(q, allowed_BxQxS)
  want_ctx = attention.context(whole, v)
  want_sv = elimination.score_vector(whole, valid, pos, causal=causal)
  ctx, colsum = attention.query_blocked(
      lambda s, n: probs(jax.lax.dynamic_slice_in_dim(q, s, n, 1),
                         jax.lax.dynamic_slice_in_dim(allowed_BxQxS, s, n, 1)),
      lambda p, s, n: attention.context(p, v), N, block, valid)
  np.testing.assert_allclose(np.asarray(ctx), np.asarray(want_ctx), atol=1e-6)
  count = elimination.score_vector(jnp.ones_like(whole) * allowed_BxQxS[:, None], valid, pos,
                                   causal=False) if causal else None
  sv = colsum * valid if not causal else colsum / jnp.maximum(count, 1.0) * valid
  np.testing.assert_allclose(np.asarray(sv), np.asarray(want_sv), atol=1e-6)


def test_gradients_through_query_blocks_match():
  q, k, v = _qkv(seed=1)
  N = q.shape[1]

  def loss(q, blocked):
    probs = lambda rows: jax.nn.softmax(attention.logits(rows, k), axis=-1)
    if not blocked:
      return jnp.sum(attention.context(probs(q), v) ** 2)
    ctx, _ = attention.query_blocked(
        lambda s, n: probs(jax.lax.dynamic_slice_in_dim(q, s, n, 1)),
        lambda p, s, n: attention.context(p, v), N, 4)
    return jnp.sum(ctx ** 2)

  np.testing.assert_allclose(np.asarray(jax.grad(loss)(q, True)),
                             np.asarray(jax.grad(loss)(q, False)), atol=1e-5)


def test_block_size_divides():
  assert attention.block_size(512, 64) == 64 and attention.block_size(48, 64) == 48
  assert attention.block_size(100, 64) == 50 and attention.block_size(7, 4) == 1
  with pytest.raises(ValueError, match="does not divide"):
    attention.query_blocked(None, None, 10, 4)


def test_bert_blocked_attention_equals_the_whole_matrix():
  """Logits, score vectors and survivors of a tiny BERT with elimination and padding; gradients too."""
  import dataclasses

  from latadj_jax.models import bert
  cfg = bert.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                        intermediate_size=32, max_position_embeddings=32,
                        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                        per_example_attention=False)
  whole = bert.BertForSequenceClassification(cfg)
  blocked = bert.BertForSequenceClassification(dataclasses.replace(cfg, attention_block=4))
  ids = np.random.default_rng(0).integers(1, 60, (2, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  params = whole.init(jax.random.PRNGKey(0), ids, mask)["params"]
  run = lambda m, p: m.apply({"params": p}, ids, mask, keep_counts=(12, 8, 5), output_scores=True)
  a, b = run(whole, params), run(blocked, params)
  np.testing.assert_allclose(np.asarray(b["logits"]), np.asarray(a["logits"]), atol=1e-5)
  for sa, sb in zip(a["scores"], b["scores"]):
    np.testing.assert_allclose(np.asarray(sb), np.asarray(sa), atol=1e-5)
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ids, mask, keep_counts=(12, 8, 5),
                                             deterministic=False,
                                             rngs={"dropout": jax.random.PRNGKey(1)})["logits"] ** 2)
  ga, gb = jax.grad(loss(whole))(params), jax.grad(loss(blocked))(params)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)
