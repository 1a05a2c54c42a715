"""Generation: a causal LM's prefill with elimination then KV-cache decoding; T5's via ``t5_generate``.

Layer ``l`` attends over the ``N_{l-1}`` word-vectors that survived the layers
below it, so its cache holds exactly those keys and values (with their validity
and original positions), plus ``max_new_tokens`` empty slots. Every shape is
static: one compile for the prefill of a (length, keep counts) pair, one for
the decode loop (a ``lax.fori_loop``).

A new token gets the causal position ``p_last + 1 + t`` (``p_last`` its row's
last valid original position) and the position id ``n_valid + t`` (GPT-2's
position embedding, Llama's RoPE position), which is HF's rule for left- and
right-padded prompts alike. The functions call the model's own ``prefill``
and ``decode`` and jit with its ``jit_options``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models.interface import Batch, Model, Output


def select_token(logits_BxV: jax.Array, rng: jax.Array, temperature: float = 0.0,
                 top_k: int = 0) -> jax.Array:
  """Returns the next token per row: argmax at temperature 0, else a top-k temperature sample."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def init_caches(kv: Sequence[dict], max_new_tokens: int) -> list[dict]:
  """Returns per-layer caches: the prefill's k/v/valid/positions plus ``max_new_tokens`` empty slots."""
  def pad(x):
    widths = [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths)  # pads are zeros: invalid slots, masked out of attention
  return [{name: pad(x) for name, x in layer.items()} for layer in kv]


def prefill_state(out: Output, attention_mask, max_new_tokens: int) -> dict:
  """Returns the decode state after a prefill: padded caches, next causal positions and position ids."""
  last_BxK = elimination.last_valid_mask(out.mask)
  return {"caches": init_caches(out.kv, max_new_tokens),
          "pos_B": jnp.sum(jnp.where(last_BxK, out.positions, 0), axis=-1) + 1,
          "pos_id_B": jnp.sum(attention_mask.astype(jnp.int32), axis=-1)}


@functools.lru_cache(maxsize=64)
def prefill_fn(model: Model, keep_counts: tuple[int, ...] | None,
               max_new_tokens: int, temperature: float = 0.0, top_k: int = 0):
  """Returns a jitted ``fn(params, input_ids, attention_mask, rng) -> (first_token_B, state)``.

  This is the time-to-first-token path: the prompt forward with elimination,
  the caches, and the first new token. ``state`` holds the caches and each
  row's next causal position and position id.
  """
  @functools.partial(jax.jit, **model.jit_options())
  def fn(params, input_ids, attention_mask, rng):
    logits_BxV, out = model.method("prefill", params, Batch(input_ids, attention_mask), keep_counts)
    state = prefill_state(out, attention_mask, max_new_tokens)
    return select_token(logits_BxV, rng, temperature, top_k), state
  return fn


@functools.lru_cache(maxsize=64)
def decode_fn(model: Model, max_new_tokens: int, temperature: float = 0.0,
              top_k: int = 0):
  """Returns a jitted ``fn(params, first_token_B, state, rng) -> (tokens_BxT, caches)``."""
  @functools.partial(jax.jit, **model.jit_options())
  def fn(params, first_token_B, state, rng):
    T = max_new_tokens
    # Layer l's prefill length is static; its new tokens go at slots offset_l + t.
    offsets = [c["k"].shape[1] - T for c in state["caches"]]
    tokens_BxT = jnp.zeros((first_token_B.shape[0], T), jnp.int32).at[:, 0].set(first_token_B)

    def step(t, loop):
      tokens_BxT, caches, rng = loop
      logits_BxV, caches = model.method("decode", params, tokens_BxT[:, t], caches,
                                        [o + t for o in offsets], state["pos_B"] + t,
                                        state["pos_id_B"] + t)
      rng, sub = jax.random.split(rng)
      nxt_B = select_token(logits_BxV, sub, temperature, top_k)
      return tokens_BxT.at[:, t + 1].set(nxt_B), caches, rng

    # T - 1 steps: the first token came from the prefill; the last slot stays unused.
    tokens_BxT, caches, _ = jax.lax.fori_loop(0, T - 1, step, (tokens_BxT, state["caches"], rng))
    return tokens_BxT, caches
  return fn


def generate(model: Model, params: Any, input_ids, attention_mask=None, *,
             max_new_tokens: int, keep_counts: Sequence[int] | None = None,
             temperature: float = 0.0, top_k: int = 0, rng: jax.Array | None = None) -> dict:
  """Returns ``{"tokens": [B, max_new_tokens], ...}``, generated after each prompt.

  The prompt is prefilled (T5: encoded) with ``keep_counts`` (None: no
  elimination). A causal LM's result also holds ``caches``: layer ``l``'s has
  ``N_{l-1} + max_new_tokens`` slots, and decoding runs all
  ``max_new_tokens`` steps (it does not stop at EOS); greedy at temperature
  0, else temperature sampling restricted to the ``top_k`` best (0: all).
  T5's (greedy) also holds ``encoder``, the encoder's output.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  B, N = input_ids.shape
  if attention_mask is None:
    attention_mask = jnp.ones((B, N), jnp.int32)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  if model.kind == "seq2seq":
    from latadj_jax.models import t5_generate
    return t5_generate.generate(model, params, input_ids, attention_mask,
                                max_new_tokens=max_new_tokens, keep_counts=keep_counts)
  max_positions = model.max_positions
  if N + max_new_tokens > max_positions:
    raise ValueError(f"prompt length {N} + max_new_tokens {max_new_tokens} exceeds the "
                     f"model's {max_positions} positions")
  if temperature < 0 or top_k < 0:
    raise ValueError(f"temperature and top_k must be >= 0, got {temperature}, {top_k}")
  counts = None if keep_counts is None else tuple(keep_counts)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  rng, first_rng = jax.random.split(rng)
  first_B, state = prefill_fn(model, counts, max_new_tokens, float(temperature), int(top_k))(
      params, input_ids, jnp.asarray(attention_mask, jnp.int32), first_rng)
  tokens, caches = decode_fn(model, max_new_tokens, float(temperature), int(top_k))(
      params, first_B, state, rng)
  return {"tokens": tokens, "caches": caches}
