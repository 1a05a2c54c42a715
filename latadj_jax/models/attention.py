"""The two attention products, written head-major for speed.

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
