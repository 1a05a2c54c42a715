"""Greedy T5 generation: the encoder runs once with elimination, then a KV-cached decode loop.

Every shape is static: the encoder's output has ``N_L`` states (its last keep
count), the decoder's self-attention cache has ``max_new_tokens`` slots, and
the loop is a ``lax.fori_loop``, so one (prompt length, keep counts,
``max_new_tokens``) triple compiles once. As HF's ``generate`` does, a row that
has emitted EOS emits the pad token from then on.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from latadj_jax.models.interface import Batch, Model


def init_caches(model: Model, batch: int, slots: int) -> list[dict]:
  """Returns per decoder block empty self-attention k/v caches of ``slots`` positions."""
  cfg = model.config
  shape = (batch, slots, cfg.num_heads, cfg.d_kv)
  return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
          for _ in range(cfg.num_decoder_layers)]


@functools.lru_cache(maxsize=64)
def generate_fn(model: Model, keep_counts: tuple[int, ...] | None,
                max_new_tokens: int):
  """Returns a jitted ``fn(params, input_ids, attention_mask) -> (tokens_BxT, encoder dict)``."""
  cfg = model.config

  @jax.jit
  def fn(params, input_ids, attention_mask):
    enc = model.method("encode", params, Batch(input_ids, attention_mask), keep_counts)
    cross = model.method("cross_kv", params, enc.last_hidden_state)
    B, T = input_ids.shape[0], max_new_tokens
    # Slot t holds the decoder input at position t: the start token, then each new token.
    inputs_BxT = jnp.full((B, T), cfg.decoder_start_token_id, jnp.int32)
    out_BxT = jnp.full((B, T), cfg.pad_token_id, jnp.int32)

    def step(t, loop):
      inputs_BxT, out_BxT, done_B, caches = loop
      logits_BxV, caches = model.method("decode_step", params, inputs_BxT[:, t], t, caches, cross,
                                        enc.mask)
      nxt_B = jnp.where(done_B, cfg.pad_token_id, jnp.argmax(logits_BxV, -1).astype(jnp.int32))
      out_BxT = out_BxT.at[:, t].set(nxt_B)
      inputs_BxT = jax.lax.dynamic_update_slice_in_dim(
          inputs_BxT, nxt_B[:, None], jnp.minimum(t + 1, T - 1), 1)
      return inputs_BxT, out_BxT, done_B | (nxt_B == cfg.eos_token_id), caches

    loop = (inputs_BxT, out_BxT, jnp.zeros((B,), bool), init_caches(model, B, T))
    _, out_BxT, _, _ = jax.lax.fori_loop(0, T, step, loop)
    return out_BxT, enc

  return fn


def generate(model: Model, params: Any, input_ids, attention_mask=None, *,
             max_new_tokens: int, keep_counts: Sequence[int] | None = None) -> dict:
  """Returns ``{"tokens": [B, max_new_tokens], "encoder": the encoder's Output}``, greedily decoded.

  ``tokens`` excludes the decoder start token (HF's output is
  ``[start] + tokens``, cut where every row has finished). The encoder runs
  with ``keep_counts`` (None: no elimination).
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  counts = None if keep_counts is None else tuple(keep_counts)
  tokens, enc = generate_fn(model, counts, int(max_new_tokens))(
      params, input_ids, jnp.asarray(attention_mask, jnp.int32))
  return {"tokens": tokens, "encoder": enc}
