"""Score vectors, ACC and Sort+Eliminate as pure jnp functions (docs/method.md sections 1 and 4).

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
# Causal models add "window": eq. 8's column sums over the last ``w`` queries only
# (SnapKV's observation window), since the last queries make the next token; and
# "last": the most recent tokens (StreamingLLM's window; with keep_sinks, StreamingLLM).
CAUSAL_RULES = ("score", "window", "first", "random", "last")


def score_vector(probs_BxHxNxN: jax.Array, valid_BxN: jax.Array, causal: bool = False,
                 queries_BxN: jax.Array | None = None) -> jax.Array:
  """Returns SV_BxN: how much each word-vector feeds the layer output (pads score 0).

  ``SV_j = sum_i A[i, j]`` with ``A`` the head-mean of the attention
  probabilities, summed over valid queries only (or over ``queries_BxN``, a
  subset of them: the ``window`` rule's last queries). With ``causal``, column
  ``j`` is divided by the number of those queries that may attend to it (paper
  eq. 8; ``causal_counts``).
  """
  valid = valid_BxN.astype(jnp.float32)
  queries = valid if queries_BxN is None else queries_BxN.astype(jnp.float32) * valid
  return finish_scores(column_sums(probs_BxHxNxN, queries), valid, causal, queries)


def column_sums(probs_BxHxQxS: jax.Array, weights_BxQ: jax.Array) -> jax.Array:
  """Returns ``sum_q w_q mean_h P[q, s]``, BxS: the score vector's numerator.

  Written as a multiply and one reduction, not a dot: XLA:CPU (jaxlib 0.10)
  hands the dot form (``einsum("bq,bhqs->bs")``, or the head mean first) to
  YNNPACK, which took 83-91 ms over 12 x 1024 x 1024 probabilities where this
  form takes 3.7 ms (2-core CPU, medians of 10).
  """
  w_Bx1xQx1 = weights_BxQ.astype(jnp.float32)[:, None, :, None]
  with jax.named_scope("scores"):
    return jnp.sum(probs_BxHxQxS.astype(jnp.float32) * w_Bx1xQx1, axis=(1, 2)) / probs_BxHxQxS.shape[1]


def causal_counts(queries_BxN: jax.Array, valid_BxN: jax.Array) -> jax.Array:
  """Returns, per column ``j``, how many of ``queries`` may attend to it (eq. 8's divisor), BxN.

  Valid tokens sit in ascending original-position order (Sort+Eliminate keeps
  the order), so the queries that see column ``j`` are the ones at slots
  ``>= j``: a reversed cumulative sum, not an N x N comparison.
  """
  w_BxN = queries_BxN.astype(jnp.float32) * valid_BxN.astype(jnp.float32)
  return jnp.cumsum(w_BxN[:, ::-1], axis=-1)[:, ::-1]


def finish_scores(colsum_BxN: jax.Array, valid_BxN: jax.Array, causal: bool = False,
                  queries_BxN: jax.Array | None = None) -> jax.Array:
  """Returns SV_BxN from ``column_sums``: eq. 8's division for a causal model, pads set to 0."""
  valid = valid_BxN.astype(jnp.float32)
  if causal:  # the divisor is selection work, not attention
    queries = valid if queries_BxN is None else queries_BxN
    colsum_BxN = colsum_BxN / jnp.maximum(causal_counts(queries, valid), 1.0)
  return colsum_BxN * valid


def last_queries(valid_BxN: jax.Array, window: int) -> jax.Array:
  """Returns a BxN mask of each row's last ``window`` valid positions (all valid ones if window <= 0)."""
  valid = valid_BxN.astype(bool)
  if window <= 0:
    return valid
  from_end_BxN = jnp.cumsum(valid[:, ::-1].astype(jnp.int32), axis=-1)[:, ::-1]
  return valid & (from_end_BxN <= window)


def first_valid(valid_BxN: jax.Array, count: int) -> jax.Array:
  """Returns a BxN mask of each row's first ``count`` valid positions (left padding too)."""
  valid = valid_BxN.astype(bool)
  return valid & (jnp.cumsum(valid.astype(jnp.int32), axis=-1) <= count)


def causal_protect(valid_BxN: jax.Array, sinks: int = 0, recent: int = 0) -> jax.Array:
  """Returns int8 protection levels for a causal model (``select_indices`` reads them).

  2: the last valid token (it makes the next one), which always survives; 1: the
  first ``sinks`` (StreamingLLM's attention sinks) and the last ``recent`` valid
  tokens, which survive whenever the layer keeps that many; 0: ranked by score.
  """
  soft = first_valid(valid_BxN, sinks)
  if recent > 0:
    soft = soft | last_queries(valid_BxN, recent)
  return jnp.where(last_valid_mask(valid_BxN), 2, soft.astype(jnp.int32)).astype(jnp.int8)


def pool_scores(sv_BxN: jax.Array, valid_BxN: jax.Array, kernel: int) -> jax.Array:
  """Returns each token's score max-pooled over its ``kernel`` nearest neighbours (pads score 0).

  SnapKV pools its window scores so that a kept token keeps its neighbours: a
  five-digit number is five tokens, and the ones that draw less attention
  still carry the answer. ``kernel`` <= 1 returns ``sv_BxN`` unchanged.
  """
  if kernel <= 1:
    return sv_BxN
  valid = valid_BxN.astype(bool)
  lo = (kernel - 1) // 2
  pooled = jax.lax.reduce_window(jnp.where(valid, sv_BxN, -jnp.inf), -jnp.inf, jax.lax.max,
                                 (1, kernel), (1, 1), [(0, 0), (lo, kernel - 1 - lo)])
  return jnp.where(valid, pooled, 0.0)


def check_causal_rule(rule: str, window: int, sinks: int, recent: int, pool: int = 0) -> None:
  """Raises ValueError, naming the config field, for a bad causal survivor setting."""
  if rule not in CAUSAL_RULES:
    raise ValueError(f"survivors must be one of {CAUSAL_RULES} for a causal LM, got {rule!r}")
  for name, value in (("score_window", window), ("keep_sinks", sinks), ("keep_recent", recent),
                      ("score_pool", pool)):
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"{name} must be an int >= 0, got {value!r}")
  if rule == "window" and window < 1:
    raise ValueError("survivors='window' needs score_window >= 1 (the last queries to score with)")


def score_queries(rule: str, valid_BxN: jax.Array, window: int, with_scores: bool,
                  eliminating: bool) -> dict[str, jax.Array]:
  """Returns the query weights (BxN) whose column sums a layer needs, by name.

  ``score``: every valid query (the score vector; eq. 8 for a causal model),
  for ACC or the ``score`` rule; ``window``: the last ``window`` valid queries,
  for the ``window`` rule. The attention accumulates ``column_sums`` for each
  while it runs (``ranking`` reads them), so the probabilities need not outlive it.
  """
  queries = {}
  if with_scores or (eliminating and rule == "score"):
    queries["score"] = valid_BxN.astype(jnp.float32)
  if eliminating and rule == "window":
    queries["window"] = last_queries(valid_BxN, window).astype(jnp.float32)
  return queries


def ranking(rule: str, colsums: dict[str, jax.Array], valid_BxN: jax.Array,
            positions_BxN: jax.Array, *, causal: bool = False, window: int = 0, pool: int = 0,
            rng: jax.Array | None = None) -> jax.Array:
  """Returns rank_BxN, positive on every position: ``select_indices`` keeps the highest.

  ``colsums`` holds the ``column_sums`` named by ``score_queries``. ``score``
  is the method (the score vector; eq. 8's division for a ``causal`` model);
  ``window`` is eq. 8 over the last ``window`` queries (equal to ``score``
  when the window covers every query); ``first`` and ``random`` are the
  paper's Table VII ablations (``first`` keeps the earliest tokens; ``random``
  draws from ``rng``, a fixed key when None, so evaluation is repeatable);
  ``last`` keeps the most recent tokens. ``pool`` > 1 max-pools the ``score``
  and ``window`` scores over that many neighbours (``pool_scores``).
  """
  rules = CAUSAL_RULES if causal else SURVIVOR_RULES
  if rule not in rules:
    raise ValueError(f"survivor rule must be one of {rules}, got {rule!r}")
  if rule in ("score", "window"):
    queries = last_queries(valid_BxN, window) if rule == "window" else None
    sv_BxN = finish_scores(colsums[rule], valid_BxN, causal=causal, queries_BxN=queries)
    return pool_scores(sv_BxN, valid_BxN, pool)
  if rule == "last":
    return 1.0 + positions_BxN.astype(jnp.float32)
  if rule == "first":
    return 1.0 / (1.0 + positions_BxN.astype(jnp.float32))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return jax.random.uniform(rng, valid_BxN.shape, minval=1e-6, maxval=1.0)


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


def select_indices(sv_BxN: jax.Array, valid_BxN: jax.Array, protect_BxN: jax.Array,
                   n_keep: int) -> jax.Array:
  """Returns idx_BxK: the ``n_keep`` top-scoring positions, in ascending original order.

  Protected positions (``[CLS]``; a causal model's last token, sinks and recent
  window) outrank every score; pads always go first, whatever their score.
  ``protect_BxN`` is a mask, or levels (``causal_protect``): level 2 outranks
  level 1, so when a layer keeps fewer than the protected, the last causal
  token still survives, then the earliest of the rest.
  """
  level_BxN = protect_BxN.astype(jnp.int32)
  rank_BxN = jnp.where(valid_BxN.astype(bool), sv_BxN.astype(jnp.float32), -1.0)
  rank_BxN = jnp.where(level_BxN >= 1, 1e30, rank_BxN)
  rank_BxN = jnp.where(level_BxN >= 2, jnp.inf, rank_BxN)
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
  with jax.named_scope("select"):
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
