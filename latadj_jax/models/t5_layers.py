"""T5's sublayers: the relative position bias (HF's buckets), attention, RMS norm and FFN.

The bias is computed from original positions, never slots, so that after
elimination a kept pair still gets the bias of its original distance. T5 does
not scale q.k, and block 0 of each stack holds the bias table (HF shares it
with the later blocks). ``t5``'s blocks are built from these modules.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.models import attention, interface


def relative_position_bucket(rel: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """Returns HF T5's bucket id for each relative position ``key_pos - query_pos``.

  The float ops follow HF's order so that bucket boundaries land identically.
  """
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(rel.dtype) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  # max(., 1) only keeps log finite where the "small" branch is taken anyway.
  log_ratio = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(rel.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(rel < max_exact, rel, large)


def position_bias(table_RxH: jax.Array, pos_q_BxQ: jax.Array, pos_k_BxK: jax.Array,
                  bidirectional: bool, max_distance: int) -> jax.Array:
  """Returns the BxHxQxK relative position bias between original positions (not slots)."""
  rel_BxQxK = pos_k_BxK[:, None, :] - pos_q_BxQ[:, :, None]
  bucket_BxQxK = relative_position_bucket(rel_BxQxK, bidirectional, table_RxH.shape[0],
                                          max_distance)
  return jnp.moveaxis(jnp.take(table_RxH, bucket_BxQxK, axis=0), -1, 1).astype(jnp.float32)


def attention_probs(q_BxQxHxK: jax.Array, k_BxSxHxK: jax.Array, bias_BxHxQxS: jax.Array,
                    allowed_BxQxS: jax.Array) -> jax.Array:
  """Returns float32 probabilities BxHxQxS; T5 does not scale q.k (masked keys get exactly 0)."""
  logits = attention.logits(q_BxQxHxK, k_BxSxHxK).astype(jnp.float32) + bias_BxHxQxS
  logits = jnp.where(allowed_BxQxS[:, None], logits, jnp.finfo(jnp.float32).min)
  return jnp.where(allowed_BxQxS[:, None], jax.nn.softmax(logits, axis=-1), 0.0)


_normal = nn.initializers.normal


class T5Attention(nn.Module):
  """Holds q/k/v/o (and block 0's relative bias table); callers run the steps in between."""
  config: Any  # a t5.T5Config
  has_relative_bias: bool = False

  def setup(self):
    cfg, f = self.config, self.config.initializer_factor
    inner = cfg.num_heads * cfg.d_kv
    dense = lambda n, std: nn.Dense(n, use_bias=False, dtype=cfg.dtype,
                                    kernel_init=_normal(f * std))
    self.q = dense(inner, (cfg.d_model * cfg.d_kv) ** -0.5)
    self.k = dense(inner, cfg.d_model ** -0.5)
    self.v = dense(inner, cfg.d_model ** -0.5)
    self.o = dense(cfg.d_model, inner ** -0.5)
    if self.has_relative_bias:
      self.relative_attention_bias = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                              embedding_init=_normal(f * cfg.d_model ** -0.5))

  def heads(self, proj: nn.Module, x_BxNxD):
    """Returns ``proj(x)`` split into heads: BxNxHxK."""
    y = proj(x_BxNxD)
    return y.reshape(y.shape[:2] + (self.config.num_heads, self.config.d_kv))

  def bias(self, pos_q_BxQ, pos_k_BxK, bidirectional: bool):
    """Returns the BxHxQxK relative position bias from this module's table."""
    return position_bias(self.relative_attention_bias.embedding, pos_q_BxQ, pos_k_BxK,
                         bidirectional, self.config.relative_attention_max_distance)

  def attend(self, q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, bias_BxHxQxS, allowed_BxQxS):
    """Returns (ctx_BxQxF with heads concatenated, float32 probs_BxHxQxS)."""
    probs = attention_probs(q_BxQxHxK, k_BxSxHxK, bias_BxHxQxS, allowed_BxQxS)
    ctx = attention.context(probs.astype(self.config.dtype), v_BxSxHxK)
    return ctx.reshape(ctx.shape[:2] + (-1,)), probs


class T5LayerNorm(nn.Module):
  """RMS norm: no mean subtraction and no bias; the variance is taken in float32."""
  config: Any  # a t5.T5Config

  @nn.compact
  def __call__(self, x_BxNxD):
    cfg = self.config
    weight_D = self.param("weight", nn.initializers.ones, (cfg.d_model,))
    x = x_BxNxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.layer_norm_epsilon)
    return (weight_D * x).astype(cfg.dtype)


class T5LayerSelfAttention(nn.Module):
  config: Any  # a t5.T5Config
  has_relative_bias: bool = False

  def setup(self):
    self.SelfAttention = T5Attention(self.config, self.has_relative_bias)
    self.layer_norm = T5LayerNorm(self.config)

  def qkv(self, h_BxNxD):
    """Returns q, k, v (BxNxHxK) of the normalised input."""
    a, x = self.SelfAttention, self.layer_norm(h_BxNxD)
    return a.heads(a.q, x), a.heads(a.k, x), a.heads(a.v, x)


class T5LayerCrossAttention(nn.Module):
  config: Any  # a t5.T5Config

  def setup(self):
    self.EncDecAttention = T5Attention(self.config)
    self.layer_norm = T5LayerNorm(self.config)

  def __call__(self, h_BxQxD, k_BxSxHxK, v_BxSxHxK, allowed_BxQxS):
    """Returns h + attention over the encoder's k/v (cross-attention has no position bias)."""
    a = self.EncDecAttention
    q = a.heads(a.q, self.layer_norm(h_BxQxD))
    zero_bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
    ctx, _ = a.attend(q, k_BxSxHxK, v_BxSxHxK, zero_bias, allowed_BxQxS)
    return h_BxQxD + a.o(ctx)


class T5LayerFF(nn.Module):
  config: Any  # a t5.T5Config

  def setup(self):
    self.DenseReluDense = T5DenseFF(self.config)
    self.layer_norm = T5LayerNorm(self.config)

  def __call__(self, h_BxNxD):
    return h_BxNxD + self.DenseReluDense(self.layer_norm(h_BxNxD))


class T5DenseFF(nn.Module):
  """``wi`` -> act -> ``wo`` (v1.0), or act(``wi_0``) * ``wi_1`` -> ``wo`` (gated, v1.1)."""
  config: Any  # a t5.T5Config

  @nn.compact
  def __call__(self, x_BxNxD):
    cfg, f = self.config, self.config.initializer_factor
    dense = lambda n, std, name: nn.Dense(n, use_bias=False, dtype=cfg.dtype, name=name,
                                          kernel_init=_normal(f * std))
    act = interface.activation(cfg.act)
    if cfg.is_gated:
      f_BxNxF = (act(dense(cfg.d_ff, cfg.d_model ** -0.5, "wi_0")(x_BxNxD))
                 * dense(cfg.d_ff, cfg.d_model ** -0.5, "wi_1")(x_BxNxD))
    else:
      f_BxNxF = act(dense(cfg.d_ff, cfg.d_model ** -0.5, "wi")(x_BxNxD))
    return dense(cfg.d_model, cfg.d_ff ** -0.5, "wo")(f_BxNxF)
