"""models/attention.py: the head-major products, and attention over query blocks (issue 25).

Blocks of queries give the same context and score-vector sums as the whole
N x N, alone and inside BERT, the decoders (GPT-2, Llama with GQA and a
sliding window) and T5's encoder, with elimination, padding and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latadj_jax import models
from latadj_jax.core import elimination
from latadj_jax.models import Batch, Options, attention


def test_head_major_products_equal_einsum():
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 5, 3, 4), np.float32), rng.standard_normal((2, 7, 3, 4), np.float32)
  probs = rng.random((2, 3, 5, 7), np.float32)
  np.testing.assert_allclose(attention.logits(q, k), np.einsum("bqhd,bshd->bhqs", q, k), atol=1e-5)
  np.testing.assert_allclose(attention.context(probs, k), np.einsum("bhqs,bshd->bqhd", probs, k),
                             atol=1e-5)


def _qkv(B=2, N=12, H=3, K=4, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (B, N, H, K)) for k in keys)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [0, 1, 4, 5, 12])  # 5: a shorter last block
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
  last3 = elimination.last_queries(valid, 3)
  ctx, sums = attention.query_blocked(
      lambda s, n: probs(jax.lax.dynamic_slice_in_dim(q, s, n, 1),
                         jax.lax.dynamic_slice_in_dim(allowed_BxQxS, s, n, 1)),
      lambda p, s, n: attention.context(p, v), N, block, {"all": valid, "last3": last3})
  np.testing.assert_allclose(np.asarray(ctx), np.asarray(want_ctx), atol=1e-6)
  for name, queries in (("all", None), ("last3", last3)):
    want_sv = elimination.score_vector(whole, valid, causal=causal, queries_BxN=queries)
    sv = elimination.finish_scores(sums[name], valid, causal, queries)
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


@pytest.mark.slow
def test_bert_blocked_attention_equals_the_whole_matrix():
  """Logits, score vectors and survivors of a tiny BERT with elimination and padding; gradients too."""
  whole = models.build({"model_type": "bert", "vocab_size": 60, "hidden_size": 24,
                        "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 32,
                        "max_position_embeddings": 32, "attention_probs_dropout_prob": 0.0,
                        "hidden_dropout_prob": 0.0}, per_example_attention=False)
  blocked = whole.replace(attention_block=4)
  ids = np.random.default_rng(0).integers(1, 60, (2, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  params = whole.init(0)
  batch = Batch(ids, mask)
  run = lambda m, p: jax.jit(lambda p: m.apply(p, batch, (12, 8, 5), options=Options(scores=True)))(p)
  a, b = run(whole, params), run(blocked, params)
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-5)
  for sa, sb in zip(a.scores, b.scores):
    np.testing.assert_allclose(np.asarray(sb), np.asarray(sa), atol=1e-5)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, batch, (12, 8, 5), options=Options(train=True),
                                             rng=jax.random.PRNGKey(1)).logits ** 2)
  ga, gb = jax.jit(jax.grad(loss(whole)))(params), jax.jit(jax.grad(loss(blocked)))(params)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def _assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=atol)


def _causal_batch(vocab, n=16):
  ids = np.random.default_rng(0).integers(1, vocab, (2, n)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding, as batched prompts are
  return ids, mask


CAUSAL = {
    "gpt2": dict(model_type="gpt2", vocab_size=60, n_positions=32, n_embd=24, n_layer=3, n_head=3,
                 attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "llama": dict(model_type="llama", vocab_size=60, hidden_size=24, intermediate_size=40,
                  num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  max_position_embeddings=32),
}


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["score", "window"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_blocked_attention_equals_the_whole_matrix(family, rule):
  """Logits, score vectors, survivors and KV of GPT-2 and Llama (GQA, sliding window) with
  left padding and elimination: blocks of 4 and 1 queries against all at once; gradients too."""
  extra = {"sliding_window": 9} if family == "llama" else {}
  whole = models.build(CAUSAL[family], survivors=rule, score_window=3, **extra)
  ids, mask = _causal_batch(60)
  batch = Batch(ids, mask)
  params = whole.init(0)
  counts = (12, 8, 5)
  run = lambda m, p: jax.jit(lambda p: m.apply(p, batch, counts, options=Options(scores=True)))(p)
  want = run(whole, params)
  for block in (5, 1):
    got = run(whole.replace(attention_block=block), params)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5)
    for key in ("scores", "layer_positions"):
      _assert_trees_close(getattr(want, key), getattr(got, key))

  def loss(m):
    train = {} if family == "llama" else {"options": Options(train=True),
                                          "rng": jax.random.PRNGKey(1)}
    return lambda p: jnp.sum(m.apply(p, batch, counts, **train).logits ** 2)
  blocked = whole.replace(attention_block=4)
  _assert_trees_close(jax.jit(jax.grad(loss(whole)))(params),
                      jax.jit(jax.grad(loss(blocked)))(params), atol=1e-4)


@pytest.mark.slow
def test_t5_blocked_encoder_equals_the_whole_matrix():
  """T5's encoder (relative position bias per query block) with padding and elimination."""
  whole = models.build({"model_type": "t5", "vocab_size": 60, "d_model": 24, "d_kv": 8,
                        "d_ff": 32, "num_layers": 3, "num_heads": 3,
                        "relative_attention_num_buckets": 8,
                        "relative_attention_max_distance": 16})
  blocked = whole.replace(attention_block=4)
  ids = np.random.default_rng(0).integers(1, 60, (2, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 11:] = 0
  params = whole.init(0)
  run = lambda m, p: m.method("encode", p, Batch(ids, mask), (12, 8, 5), Options(scores=True))
  want, got = jax.jit(lambda p: run(whole, p))(params), jax.jit(lambda p: run(blocked, p))(params)
  for key in ("last_hidden_state", "scores", "layer_positions", "mask"):
    _assert_trees_close(getattr(want, key), getattr(got, key))
  loss = lambda m: lambda p: jnp.sum(run(m, p).last_hidden_state ** 2)
  _assert_trees_close(jax.jit(jax.grad(loss(whole)))(params),
                      jax.jit(jax.grad(loss(blocked)))(params), atol=1e-4)
