"""KV-cache generation for Llama-family models, mirroring ``gpt2_generate``.

The prompt is prefilled with elimination; layer ``l``'s cache then holds the
keys (already rotated) and values of the ``N_{l-1}`` word-vectors it attended
over, plus ``max_new_tokens`` empty slots. A new token gets the causal
position ``p_last + 1 + t`` and the RoPE position id ``n_valid + t`` (HF's
rule for left- and right-padded prompts alike), so the cached survivors keep
the rotations of their original positions and the new tokens continue after
them. Token selection and cache padding are ``gpt2_generate``'s.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models import gpt2_generate
from latadj_jax.models.gpt2_generate import init_caches, select_token
from latadj_jax.models.llama import LlamaForCausalLM, jit_options


def prefill_state(logits_BxV, out: dict, attention_mask, max_new_tokens: int) -> dict:
  """Returns the decode state after a prefill: padded caches, next causal and RoPE positions."""
  last_BxK = elimination.last_valid_mask(out["mask"])
  return {"caches": init_caches(out["kv"], max_new_tokens),
          "pos_B": jnp.sum(jnp.where(last_BxK, out["positions"], 0), axis=-1) + 1,
          "pos_id_B": jnp.sum(attention_mask.astype(jnp.int32), axis=-1)}


@functools.lru_cache(maxsize=64)
def prefill_fn(module: LlamaForCausalLM, keep_counts: tuple[int, ...] | None,
               max_new_tokens: int, temperature: float = 0.0, top_k: int = 0):
  """Returns a jitted ``fn(params, input_ids, attention_mask, rng) -> (first_token_B, state)``.

  This is the time-to-first-token path: the prompt forward with elimination,
  the caches and the first new token.
  """
  @functools.partial(jax.jit, **jit_options(module))
  def fn(params, input_ids, attention_mask, rng):
    logits_BxV, out = module.apply({"params": params}, input_ids, attention_mask, keep_counts,
                                   method=LlamaForCausalLM.prefill)
    state = prefill_state(logits_BxV, out, attention_mask, max_new_tokens)
    return select_token(logits_BxV, rng, temperature, top_k), state
  return fn


@functools.lru_cache(maxsize=64)
def decode_fn(module: LlamaForCausalLM, max_new_tokens: int, temperature: float = 0.0,
              top_k: int = 0):
  """Returns a jitted ``fn(params, first_token_B, state, rng) -> (tokens_BxT, caches)``."""
  @functools.partial(jax.jit, **jit_options(module))
  def fn(params, first_token_B, state, rng):
    T = max_new_tokens
    offsets = [c["k"].shape[1] - T for c in state["caches"]]
    tokens_BxT = jnp.zeros((first_token_B.shape[0], T), jnp.int32).at[:, 0].set(first_token_B)

    def step(t, loop):
      tokens_BxT, caches, rng = loop
      logits_BxV, caches = module.apply(
          {"params": params}, tokens_BxT[:, t], caches, [o + t for o in offsets],
          state["pos_B"] + t, state["pos_id_B"] + t, method=LlamaForCausalLM.decode)
      rng, sub = jax.random.split(rng)
      return tokens_BxT.at[:, t + 1].set(select_token(logits_BxV, sub, temperature, top_k)), caches, rng

    tokens_BxT, caches, _ = jax.lax.fori_loop(0, T - 1, step, (tokens_BxT, state["caches"], rng))
    return tokens_BxT, caches
  return fn


def generate(module: LlamaForCausalLM, params: Any, input_ids, attention_mask=None, *,
             max_new_tokens: int, keep_counts: Sequence[int] | None = None,
             temperature: float = 0.0, top_k: int = 0, rng: jax.Array | None = None) -> dict:
  """Returns ``{"tokens": [B, max_new_tokens], "caches": per-layer caches}``.

  As ``gpt2_generate.generate``: the prompt prefilled with ``keep_counts``
  (None: no elimination), greedy at temperature 0, no stop at EOS.
  """
  return gpt2_generate.run(module, params, input_ids, attention_mask,
                           module.config.max_position_embeddings, prefill_fn, decode_fn,
                           max_new_tokens=max_new_tokens, keep_counts=keep_counts,
                           temperature=temperature, top_k=top_k, rng=rng)
