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
