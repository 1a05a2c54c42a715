"""The two attention products, written head-major for speed.

``einsum("bqhd,bkhd->bhqk")`` (the form HF's Flax models use) leaves the head
axis in the middle of both operands; XLA:CPU then runs the batched dot about
2.5x slower than when the operands are first transposed to ``[B, H, N, K]``
(measured on BERT-base shapes, batch 8 x 128 tokens: see
``benchmarks/results/attention_layout.json``). The results are the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logits(q_BxQxHxK: jax.Array, k_BxSxHxK: jax.Array) -> jax.Array:
  """Returns q . k over the head dimension, BxHxQxS (unscaled)."""
  return jnp.matmul(q_BxQxHxK.transpose(0, 2, 1, 3), k_BxSxHxK.transpose(0, 2, 3, 1))


def context(probs_BxHxQxS: jax.Array, v_BxSxHxK: jax.Array) -> jax.Array:
  """Returns the probability-weighted values, BxQxHxK."""
  return jnp.matmul(probs_BxHxQxS, v_BxSxHxK.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
