"""Llama-family attention math: rotary position embeddings (RoPE) and grouped-query attention.

Functions of arrays (and of the config's RoPE fields), used by
``llama.LlamaAttention``. RoPE follows HF's rotate-half layout and computes
its frequencies in float32 as HF does (default, linear and Llama 3.1
scaling). Grouped-query attention (fewer k/v heads than q heads) is computed
per k/v head group, without copying k and v.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# --- rotary position embeddings -----------------------------------------------------------------
def rope_inv_freq(cfg: Any) -> np.ndarray:
  """Returns the float32 inverse frequencies [head_dim / 2], computed as HF computes them.

  ``cfg`` is a ``llama.LlamaConfig`` (its ``head_dim`` and ``rope_*`` fields); it is not
  imported here, since ``llama`` imports this module.
  """
  dim = cfg.head_dim
  inv = (np.float32(1.0) / np.float32(cfg.rope_theta)
         ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
  if cfg.rope_type == "linear":
    return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
  if cfg.rope_type == "llama3":  # Llama 3.1: stretch low frequencies, keep high, blend between
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_positions
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, blended, scaled).astype(np.float32)
  return inv


def rope_cos_sin(pos_BxN: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Returns (cos, sin), each BxNx1xK float32, for RoPE position ids ``pos_BxN``."""
  freqs_BxNxF = pos_BxN.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb_BxNxK = jnp.concatenate([freqs_BxNxF, freqs_BxNxF], axis=-1)
  return jnp.cos(emb_BxNxK)[:, :, None], jnp.sin(emb_BxNxK)[:, :, None]


def apply_rope(x_BxNxHxK: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Returns x rotated by its positions (HF's rotate-half layout: pairs are (i, i + K/2))."""
  half = x_BxNxHxK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxNxHxK[..., half:], x_BxNxHxK[..., :half]], axis=-1)
  return x_BxNxHxK * cos.astype(x_BxNxHxK.dtype) + rotated * sin.astype(x_BxNxHxK.dtype)


# --- grouped-query attention ----------------------------------------------------------------------
def gqa_probs(q_BxQxHxK: jax.Array, k_BxSxGxK: jax.Array, allowed_BxQxS: jax.Array) -> jax.Array:
  """Returns float32 attention probabilities BxHxQxS; query head h reads k/v head h // (H/G).

  The queries of one k/v group are stacked into one matmul, so k is not repeated.
  """
  B, Q, H, K = q_BxQxHxK.shape
  G = k_BxSxGxK.shape[2]
  q_BxGxRQxK = q_BxQxHxK.transpose(0, 2, 1, 3).reshape(B, G, (H // G) * Q, K)
  logits = jnp.matmul(q_BxGxRQxK, k_BxSxGxK.transpose(0, 2, 3, 1)).reshape(B, H, Q, -1)
  logits = logits.astype(jnp.float32) * K ** -0.5
  # `where`, not an added bias: a fully masked row (a left pad) stays finite.
  logits = jnp.where(allowed_BxQxS[:, None], logits, jnp.finfo(jnp.float32).min)
  return jnp.where(allowed_BxQxS[:, None], jax.nn.softmax(logits, axis=-1), 0.0)


def gqa_context(probs_BxHxQxS: jax.Array, v_BxSxGxK: jax.Array) -> jax.Array:
  """Returns the probability-weighted values with heads concatenated, BxQx(H*K)."""
  B, H, Q, S = probs_BxHxQxS.shape
  G = v_BxSxGxK.shape[2]
  ctx = jnp.matmul(probs_BxHxQxS.reshape(B, G, (H // G) * Q, S), v_BxSxGxK.transpose(0, 2, 1, 3))
  return ctx.reshape(B, H, Q, -1).transpose(0, 2, 1, 3).reshape(B, Q, -1)
