"""Attention math shared by the families: the two products (head-major), blocked queries,
BERT's bidirectional attention, grouped-query attention and the causal mask.

The products are written head-major for speed.

``einsum("bqhd,bkhd->bhqk")`` (the form HF's Flax models use) leaves the head
axis in the middle of both operands; XLA:CPU then runs the batched dot about
2.5x slower than when the operands are first transposed to ``[B, H, N, K]``
(measured on BERT-base shapes, batch 8 x 128 tokens: see
``benchmarks/results/attention_layout.json``). The results are the same numbers.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from latadj_jax.core import elimination


def logits(q_BxQxHxK: jax.Array, k_BxSxHxK: jax.Array) -> jax.Array:
  """Returns q . k over the head dimension, BxHxQxS (unscaled)."""
  return jnp.matmul(q_BxQxHxK.transpose(0, 2, 1, 3), k_BxSxHxK.transpose(0, 2, 3, 1))


def context(probs_BxHxQxS: jax.Array, v_BxSxHxK: jax.Array) -> jax.Array:
  """Returns the probability-weighted values, BxQxHxK."""
  return jnp.matmul(probs_BxHxQxS, v_BxSxHxK.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def query_blocked(probs_of: Callable[[jax.Array, int], jax.Array],
                  context_of: Callable[[jax.Array, jax.Array, int], jax.Array],
                  num_queries: int, block: int,
                  weights: Mapping[str, jax.Array] | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs attention one block of queries at a time, so the whole BxHxQxS is never written.

  ``probs_of(start, size)`` returns the float32 probabilities ``BxHxsizexS`` of
  queries ``start .. start+size-1``; ``context_of(probs, start, size)`` their
  context ``Bxsizex...``. For each named BxQ query weighting in ``weights``
  the head-mean column sums ``sum_q w_q mean_h P[q, s]`` (a score vector's
  numerator, ``elimination.column_sums``) accumulate inside the loop. A loop
  runs the full blocks and one shorter block takes the rest; ``block`` 0, or
  one as long as the queries, runs them all in one pass with no loop.
  Returns (context ``BxQx...``, {name: column sums ``BxS``}).
  """
  with jax.named_scope("attend"):
    return _query_blocked(probs_of, context_of, num_queries, block, dict(weights or {}))


def _query_blocked(probs_of, context_of, num_queries, block, weights):
  def one(start, size, sums):
    probs = probs_of(start, size)
    rows = lambda w: jax.lax.dynamic_slice_in_dim(w, start, size, axis=1)
    return ({n: sums[n] + elimination.column_sums(probs, rows(w)) for n, w in weights.items()},
            context_of(probs, start, size))

  probe = jax.eval_shape(lambda: probs_of(0, 1))
  zeros = {n: jnp.zeros((probe.shape[0], probe.shape[-1]), jnp.float32) for n in weights}
  if block <= 0 or block >= num_queries:
    return one(0, num_queries, zeros)[::-1]
  n_full, rest = divmod(num_queries, block)
  sums, ctx_n = jax.lax.scan(lambda sums, i: one(i * block, block, sums), zeros,
                             jnp.arange(n_full))
  ctx = jnp.moveaxis(ctx_n, 0, 1).reshape((ctx_n.shape[1], n_full * block) + ctx_n.shape[3:])
  if rest:
    sums, ctx_rest = one(n_full * block, rest, sums)
    ctx = jnp.concatenate([ctx, ctx_rest], axis=1)
  return ctx, sums


def block_dropout(rng: jax.Array | None, rate: float):
  """Returns ``dropout(probs, start)`` for ``query_blocked``'s ``context_of`` (identity without rng).

  Each block draws its own mask (the key folded with the block's first query),
  after the score vector's column sums have read the probabilities.
  """
  if rng is None or rate <= 0.0:
    return lambda probs, start: probs
  return lambda probs, start: jnp.where(
      jax.random.bernoulli(jax.random.fold_in(rng, start), 1.0 - rate, probs.shape),
      probs / (1.0 - rate), 0.0)


def attention_bias(valid_BxN: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Returns the additive Bx1x1xN key mask: 0 for valid keys, a huge negative for pads."""
  return jnp.where(valid_BxN[:, None, None, :].astype(bool), 0.0,
                   jnp.finfo(dtype).min).astype(dtype)


def bidirectional(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, dtype, queries: dict):
  """Returns (ctx_BxNxHxK, float32 probs_BxHxNxN, {name: column sums BxN}) for one batch of heads.

  Softmax runs in float32: the score vector and ACC are sums of these probabilities.
  """
  # Scaling q (N x K values) rather than the logits (N x N) saves a pass over the largest array.
  logits_BxHxNxN = logits(q_BxNxHxK * q_BxNxHxK.shape[-1] ** -0.5, k_BxNxHxK)
  probs_BxHxNxN = jax.nn.softmax(
      logits_BxHxNxN.astype(jnp.float32) + attention_bias(valid_BxN), axis=-1)
  ctx_BxNxHxK = context(probs_BxHxNxN.astype(dtype), v_BxNxHxK)
  sums = {n: elimination.column_sums(probs_BxHxNxN, w) for n, w in queries.items()}
  return ctx_BxNxHxK, probs_BxHxNxN, sums


def bidirectional_blocked(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, dtype, queries: dict,
                          block: int, dropout):
  """Returns (ctx_BxNxHxK, column sums): ``bidirectional`` over blocks of ``block`` queries.

  ``dropout(probs, start)`` (``block_dropout``; the identity in inference)
  drops each block's probabilities after the column sums have read them, as
  the whole-matrix path does.
  """
  N = q_BxNxHxK.shape[1]
  q_scaled = q_BxNxHxK * q_BxNxHxK.shape[-1] ** -0.5
  bias = attention_bias(valid_BxN)

  def probs_of(start, size):
    rows = jax.lax.dynamic_slice_in_dim(q_scaled, start, size, axis=1)
    return jax.nn.softmax(logits(rows, k_BxNxHxK).astype(jnp.float32) + bias, axis=-1)

  def context_of(probs, start, size):
    return context(dropout(probs, start).astype(dtype), v_BxNxHxK)

  return query_blocked(probs_of, context_of, N, block, queries)


def bidirectional_per_example(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, dtype, queries: dict):
  """Returns (ctx_BxNxHxK, column sums): ``bidirectional`` one example at a time.

  The same numbers as the batched form, but each step's HxNxN probabilities
  are small enough to stay in cache, which makes the attention 1.4 to 2.4x
  faster on CPU (``benchmarks/attention_layout.py``). Inference only: the
  probabilities never leave the loop, so there is nothing to apply dropout to.
  """
  def one(args):
    q, k, v, valid, weights = args
    ctx, _, sums = bidirectional(q[None], k[None], v[None], valid[None], dtype,
                                 {n: w[None] for n, w in weights.items()})
    return ctx[0], {n: s[0] for n, s in sums.items()}
  return jax.lax.map(one, (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, dict(queries)))


def gqa_probs(q_BxQxHxK: jax.Array, k_BxSxGxK: jax.Array, allowed_BxQxS: jax.Array,
              scale: float) -> jax.Array:
  """Returns float32 attention probabilities BxHxQxS; query head h reads k/v head h // (H/G).

  The queries of one k/v group are stacked into one matmul, so k is not
  repeated; with as many k/v heads as query heads (G = H) this is plain
  multi-head attention. Masked keys get exactly 0.
  """
  B, Q, H, K = q_BxQxHxK.shape
  G = k_BxSxGxK.shape[2]
  q_BxGxRQxK = q_BxQxHxK.transpose(0, 2, 1, 3).reshape(B, G, (H // G) * Q, K)
  logits_ = jnp.matmul(q_BxGxRQxK, k_BxSxGxK.transpose(0, 2, 3, 1)).reshape(B, H, Q, -1)
  logits_ = logits_.astype(jnp.float32) * scale
  # `where`, not an added bias: a fully masked row (a left pad) stays finite.
  logits_ = jnp.where(allowed_BxQxS[:, None], logits_, jnp.finfo(jnp.float32).min)
  return jnp.where(allowed_BxQxS[:, None], jax.nn.softmax(logits_, axis=-1), 0.0)


def gqa_context(probs_BxHxQxS: jax.Array, v_BxSxGxK: jax.Array) -> jax.Array:
  """Returns the probability-weighted values with heads concatenated, BxQx(H*K)."""
  B, H, Q, S = probs_BxHxQxS.shape
  G = v_BxSxGxK.shape[2]
  ctx = jnp.matmul(probs_BxHxQxS.reshape(B, G, (H // G) * Q, S), v_BxSxGxK.transpose(0, 2, 1, 3))
  return ctx.reshape(B, H, Q, -1).transpose(0, 2, 1, 3).reshape(B, Q, -1)


def causal_allowed(pos_q_BxQ: jax.Array, pos_k_BxS: jax.Array, valid_k_BxS: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
  """Returns the BxQxS mask of keys each query may see: earlier-or-same original position,
  within the sliding window if there is one, not a pad.

  Slots are renumbered by elimination, so causality must compare the carried
  original positions, never slot indices.
  """
  allowed = (pos_q_BxQ[:, :, None] >= pos_k_BxS[:, None, :]) & valid_k_BxS[:, None, :].astype(bool)
  if sliding_window:
    allowed &= (pos_q_BxQ[:, :, None] - pos_k_BxS[:, None, :]) < sliding_window
  return allowed
