"""Rotary position embeddings (RoPE), as HF computes them: the decoders' rotary variants.

RoPE follows HF's rotate-half layout and computes its frequencies in float32
as HF does (default, linear and Llama 3.1 scaling). Each word-vector is
rotated by its original position id, which travels with it through
Sort+Eliminate, so a survivor keeps the rotation of where it was in the prompt.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(cfg: Any) -> np.ndarray:
  """Returns the float32 inverse frequencies [head_dim / 2], computed as HF computes them.

  ``cfg`` is a ``decoder.DecoderConfig`` (its ``head_dim`` and ``rope_*`` fields).
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
