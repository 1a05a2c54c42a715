"""The two attention products, written head-major for speed.

``einsum("bqhd,bkhd->bhqk")`` (the form HF's Flax models use) leaves the head
axis in the middle of both operands; XLA:CPU then runs the batched dot about
2.5x slower than when the operands are first transposed to ``[B, H, N, K]``
(measured on BERT-base shapes, batch 8 x 128 tokens: see
``benchmarks/results/attention_layout.json``). The results are the same numbers.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def logits(q_BxQxHxK: jax.Array, k_BxSxHxK: jax.Array) -> jax.Array:
  """Returns q . k over the head dimension, BxHxQxS (unscaled)."""
  return jnp.matmul(q_BxQxHxK.transpose(0, 2, 1, 3), k_BxSxHxK.transpose(0, 2, 3, 1))


def context(probs_BxHxQxS: jax.Array, v_BxSxHxK: jax.Array) -> jax.Array:
  """Returns the probability-weighted values, BxQxHxK."""
  return jnp.matmul(probs_BxHxQxS, v_BxSxHxK.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def query_blocked(probs_of: Callable[[jax.Array, int], jax.Array],
                  context_of: Callable[[jax.Array, jax.Array, int], jax.Array],
                  num_queries: int, block: int, weights_BxQ: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Runs attention one block of queries at a time, so the whole BxHxQxS is never written.

  ``probs_of(start, size)`` returns the float32 probabilities ``BxHxsizexS`` of
  queries ``start .. start+size-1``; ``context_of(probs, start, size)`` their
  context ``Bxsizex...``. With ``weights_BxQ`` the head-mean column sums
  ``sum_q w_q mean_h P[q, s]`` (the score vector's numerator) accumulate
  inside the loop. ``block`` must divide ``num_queries`` (``block_size``
  picks one). Returns (context ``BxQx...``, column sums ``BxS`` or None).
  """
  if num_queries % block:
    raise ValueError(f"query block {block} does not divide {num_queries} queries")
  n = num_queries // block

  def body(colsum, i):
    start = i * block
    probs = probs_of(start, block)
    ctx = context_of(probs, start, block)
    if weights_BxQ is not None:
      w = jax.lax.dynamic_slice_in_dim(weights_BxQ, start, block, axis=1).astype(jnp.float32)
      colsum = colsum + jnp.einsum("bq,bhqs->bs", w, probs) / probs.shape[1]
    return colsum, ctx

  probe = jax.eval_shape(lambda: probs_of(0, block))
  colsum, ctx_n = jax.lax.scan(body, jnp.zeros((probe.shape[0], probe.shape[-1]), jnp.float32),
                               jnp.arange(n))
  ctx = jnp.moveaxis(ctx_n, 0, 1).reshape((ctx_n.shape[1], num_queries) + ctx_n.shape[3:])
  return ctx, (colsum if weights_BxQ is not None else None)


def block_size(num_queries: int, target: int) -> int:
  """Returns the largest divisor of ``num_queries`` that is at most ``target`` (>= 1)."""
  for b in range(min(target, num_queries), 0, -1):
    if num_queries % b == 0:
      return b
  return 1
