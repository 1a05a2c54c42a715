"""Score vectors, ACC and Sort+Eliminate as pure jnp functions (METHOD.md sections 1 and 4).

Shapes are in names: ``B`` batch, ``H`` heads, ``N`` current length (it shrinks
layer by layer), ``K`` the number of word-vectors kept by a layer.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Selection = Literal["gather", "onehot"]
# Which word-vectors survive at the given keep counts (paper Table VII ablation):
# "score" ranks by the score vector (the method), "first" keeps the earliest
# positions (no sort), "random" keeps a random subset.
SURVIVOR_RULES = ("score", "first", "random")


def score_vector(probs_BxHxNxN: jax.Array, valid_BxN: jax.Array,
                 positions_BxN: jax.Array | None = None,
                 causal: bool = False) -> jax.Array:
  """Returns SV_BxN: how much each word-vector feeds the layer output (pads score 0).

  ``SV_j = sum_i A[i, j]`` with ``A`` the head-mean of the attention
  probabilities, summed over valid queries only. With ``causal``, column ``j``
  is divided by the number of valid queries that may attend to it (paper eq. 8),
  counted from the carried original ``positions`` so it stays right after
  elimination.
  """
  valid = valid_BxN.astype(jnp.float32)
  attn_BxNxN = jnp.mean(probs_BxHxNxN.astype(jnp.float32), axis=1)
  sv_BxN = jnp.einsum("bq,bqk->bk", valid, attn_BxNxN)
  if causal:
    if positions_BxN is None:
      positions_BxN = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
    sees_BxQxK = positions_BxN[:, :, None] >= positions_BxN[:, None, :]
    count_BxN = jnp.einsum("bq,bqk->bk", valid, sees_BxQxK.astype(jnp.float32))
    sv_BxN = sv_BxN / jnp.maximum(count_BxN, 1.0)
  return sv_BxN * valid


def masked_median(x_BxN: jax.Array, valid_BxN: jax.Array) -> jax.Array:
  """Returns the median over the valid entries of each row (mean of the two middles)."""
  n_B = jnp.sum(valid_BxN, axis=-1).astype(jnp.int32)
  sorted_BxN = jnp.sort(jnp.where(valid_BxN, x_BxN, jnp.inf), axis=-1)
  lo = jnp.take_along_axis(sorted_BxN, jnp.maximum((n_B - 1) // 2, 0)[:, None], -1)
  hi = jnp.take_along_axis(sorted_BxN, jnp.maximum(n_B // 2, 0)[:, None], -1)
  return 0.5 * (lo[:, 0] + hi[:, 0])


def acc(sv_BxN: jax.Array, valid_BxN: jax.Array) -> jax.Array:
  """Returns ACC_B = median_j SV_j / mean_j SV_j over each example's valid tokens."""
  valid = valid_BxN.astype(bool)
  n_B = jnp.maximum(jnp.sum(valid, axis=-1), 1)
  mean_B = jnp.sum(jnp.where(valid, sv_BxN, 0.0), axis=-1) / n_B
  return masked_median(sv_BxN, valid) / mean_B


def survivor_ranking(rule: str, sv_BxN: jax.Array, positions_BxN: jax.Array,
                     rng: jax.Array | None = None) -> jax.Array:
  """Returns rank_BxN, positive on every position: ``select_indices`` keeps the highest.

  ``score`` is the method; ``first`` and ``random`` are the paper's ablations
  (Table VII) at the same keep counts. ``random`` draws from ``rng`` (a fixed key
  when None, so evaluation is repeatable).
  """
  if rule == "score":
    return sv_BxN
  if rule == "first":
    return 1.0 / (1.0 + positions_BxN.astype(jnp.float32))
  if rule == "random":
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return jax.random.uniform(rng, sv_BxN.shape, minval=1e-6, maxval=1.0)
  raise ValueError(f"survivor rule must be one of {SURVIVOR_RULES}, got {rule!r}")


def select_indices(sv_BxN: jax.Array, valid_BxN: jax.Array, protect_BxN: jax.Array,
                   n_keep: int) -> jax.Array:
  """Returns idx_BxK: the ``n_keep`` top-scoring positions, in ascending original order.

  Protected positions (``[CLS]``, the last causal token) always survive; pads
  always go first, whatever their score.
  """
  rank_BxN = jnp.where(valid_BxN.astype(bool), sv_BxN.astype(jnp.float32), -1.0)
  rank_BxN = jnp.where(protect_BxN.astype(bool), jnp.inf, rank_BxN)
  _, idx_BxK = jax.lax.top_k(rank_BxN, n_keep)
  return jnp.sort(idx_BxK, axis=-1)


def gather(x_BxN_: jax.Array, idx_BxK: jax.Array,
           method: Selection = "gather") -> jax.Array:
  """Returns x at the kept positions, along axis 1: shape ``[B, K, ...]``.

  ``onehot`` selects with a one-hot matmul instead of a gather; accelerators
  such as TPUs prefer it. Integer and boolean arrays always use the gather.
  """
  if method == "onehot" and jnp.issubdtype(x_BxN_.dtype, jnp.floating):
    onehot_BxKxN = jax.nn.one_hot(idx_BxK, x_BxN_.shape[1], dtype=x_BxN_.dtype)
    flat = x_BxN_.reshape(x_BxN_.shape[:2] + (-1,))
    out = jnp.einsum("bkn,bnf->bkf", onehot_BxKxN, flat,
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(idx_BxK.shape + x_BxN_.shape[2:])
  idx = idx_BxK.reshape(idx_BxK.shape + (1,) * (x_BxN_.ndim - 2))
  return jnp.take_along_axis(x_BxN_, idx, axis=1)


def eliminate(sv_BxN: jax.Array, valid_BxN: jax.Array, protect_BxN: jax.Array,
              n_keep: int, *arrays_BxN_: jax.Array,
              method: Selection = "gather") -> tuple[jax.Array, ...]:
  """Returns ``(idx_BxK, *arrays_BxK_)``: Sort+Eliminate applied to every carried array."""
  idx_BxK = select_indices(sv_BxN, valid_BxN, protect_BxN, n_keep)
  return (idx_BxK,) + tuple(gather(a, idx_BxK, method) for a in arrays_BxN_)


def last_valid_mask(valid_BxN: jax.Array) -> jax.Array:
  """Returns a BxN mask that is true at each row's last valid token (what a causal head reads)."""
  valid = valid_BxN.astype(jnp.int32)
  last_B = valid.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
  return jnp.arange(valid.shape[1])[None, :] == last_B[:, None]


def first_token_mask(valid_BxN: jax.Array) -> jax.Array:
  """Returns a BxN mask that is true at position 0 (BERT's ``[CLS]``)."""
  return jnp.zeros(valid_BxN.shape, bool).at[:, 0].set(True)
