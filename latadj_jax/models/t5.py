"""Flax (linen) T5 encoder-decoder with Sort+Eliminate in the encoder.

Parameter names mirror Hugging Face's Flax T5 (``shared/embedding``,
``encoder/block/0/layer/0/SelfAttention/q/kernel``, ``layer_norm/weight``,
``decoder/block/0/layer/1/EncDecAttention``, ``lm_head/kernel``), so a
``flax_model.msgpack`` loads as it is. It covers T5 v1.0 (ReLU FFN, tied head
rescaled by ``d_model**-0.5``) and v1.1/Flan-T5 (gated-GELU FFN, untied head).
It is inference-only (no dropout): the paper applies the method to Flan-T5
with no training (its Table VI).

Each encoder block attends over all ``N_{l-1}`` word-vectors, then keeps
``N_l`` of them after the heads are concatenated, before ``o``; ``o``, the
residual and the FFN run on the kept ones (METHOD.md section 4). The relative
position bias of every layer is computed from the carried original positions,
so a kept pair gets the bias of its original distance. The decoder's
cross-attention sees exactly the surviving encoder states. The relative
position bias and the attention module are in ``t5_attention``; greedy
generation with a KV cache is in ``t5_generate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models import attention, t5_attention
from latadj_jax.models.bert import activation, check_keep_counts
from latadj_jax.models.t5_attention import T5Attention

MODEL_TYPES = ("t5",)
BASE_PREFIX = ""  # no body scope: shared, encoder, decoder and lm_head sit at the top


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 hyperparameters (the fields of HF's ``T5Config`` that the model uses)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  initializer_factor: float = 1.0
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True      # the head reuses ``shared`` (no lm_head parameter)
  scale_decoder_outputs: bool | None = None  # None: same as tie_word_embeddings (pre-v5 configs)
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: str = "float32"          # activations; parameters stay float32
  selection: str = "gather"       # "gather" or "onehot" token selection
  attention_block: int = 0        # encoder: attend this many queries at a time (0: all at once)

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "T5Config":
    """Returns a T5Config from an HF config object or dict, with overrides applied."""
    src = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    # HF's "dtype" is the checkpoint's storage type, not our activation type.
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: v for k, v in src.items() if k in fields and v is not None}
    if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
      kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act(self) -> str:
    # HF maps "gated-gelu" to the tanh approximation, for backward compatibility.
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]


_normal = nn.initializers.normal


class T5LayerNorm(nn.Module):
  """RMS norm: no mean subtraction and no bias; the variance is taken in float32."""
  config: T5Config

  @nn.compact
  def __call__(self, x_BxNxD):
    cfg = self.config
    weight_D = self.param("weight", nn.initializers.ones, (cfg.d_model,))
    x = x_BxNxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.layer_norm_epsilon)
    return (weight_D * x).astype(cfg.dtype)


class T5LayerSelfAttention(nn.Module):
  config: T5Config
  has_relative_bias: bool = False

  def setup(self):
    self.SelfAttention = T5Attention(self.config, self.has_relative_bias)
    self.layer_norm = T5LayerNorm(self.config)

  def qkv(self, h_BxNxD):
    """Returns q, k, v (BxNxHxK) of the normalised input."""
    a, x = self.SelfAttention, self.layer_norm(h_BxNxD)
    return a.heads(a.q, x), a.heads(a.k, x), a.heads(a.v, x)


class T5LayerCrossAttention(nn.Module):
  config: T5Config

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
  config: T5Config

  def setup(self):
    self.DenseReluDense = T5DenseFF(self.config)
    self.layer_norm = T5LayerNorm(self.config)

  def __call__(self, h_BxNxD):
    return h_BxNxD + self.DenseReluDense(self.layer_norm(h_BxNxD))


class T5DenseFF(nn.Module):
  """``wi`` -> act -> ``wo`` (v1.0), or act(``wi_0``) * ``wi_1`` -> ``wo`` (gated, v1.1)."""
  config: T5Config

  @nn.compact
  def __call__(self, x_BxNxD):
    cfg, f = self.config, self.config.initializer_factor
    dense = lambda n, std, name: nn.Dense(n, use_bias=False, dtype=cfg.dtype, name=name,
                                          kernel_init=_normal(f * std))
    act = activation(cfg.act)
    if cfg.is_gated:
      f_BxNxF = (act(dense(cfg.d_ff, cfg.d_model ** -0.5, "wi_0")(x_BxNxD))
                 * dense(cfg.d_ff, cfg.d_model ** -0.5, "wi_1")(x_BxNxD))
    else:
      f_BxNxF = act(dense(cfg.d_ff, cfg.d_model ** -0.5, "wi")(x_BxNxD))
    return dense(cfg.d_model, cfg.d_ff ** -0.5, "wo")(f_BxNxF)


class T5Block(nn.Module):
  """The sublayers "0", "1"(, "2") of one block; it sits at HF's ``block/<i>/layer`` scope."""
  config: T5Config
  has_relative_bias: bool
  decoder: bool

  def setup(self):
    cfg = self.config
    subs = [T5LayerSelfAttention(cfg, self.has_relative_bias, name="0")]
    if self.decoder:
      subs.append(T5LayerCrossAttention(cfg, name="1"))
    subs.append(T5LayerFF(cfg, name=str(len(subs))))
    self.sub = subs

  def bias(self, pos_q_BxQ, pos_k_BxK):
    """Returns the relative position bias (only block 0 has the table; HF shares it)."""
    return self.sub[0].SelfAttention.bias(pos_q_BxQ, pos_k_BxK, not self.decoder)

  def encode(self, h_BxNxD, carry: dict, bias_of, n_keep: int, with_scores: bool):
    """Returns (h_BxKxD, carry at the kept positions, SV_BxN or None).

    ``bias_of(start, size)`` returns the position bias of queries ``start ..
    start+size-1``, BxHxsizexN; the attention runs ``attention_block`` queries at a
    time (0: all at once).
    """
    cfg, sa = self.config, self.sub[0]
    q, k, v = sa.qkv(h_BxNxD)
    valid = carry["valid"]
    N = valid.shape[1]

    def probs_of(start, size):
      rows = jax.lax.dynamic_slice_in_dim(q, start, size, axis=1)
      allowed = jnp.broadcast_to(valid[:, None, :], (valid.shape[0], size, N))
      return t5_attention.attention_probs(rows, k, bias_of(start, size), allowed)

    def context_of(probs, start, size):
      ctx = attention.context(probs.astype(cfg.dtype), v)
      return ctx.reshape(ctx.shape[:2] + (-1,))

    weights = {"score": valid} if with_scores or n_keep < N else None
    ctx_BxNxF, sums = attention.query_blocked(probs_of, context_of, N, cfg.attention_block,
                                              weights)
    sv_BxN = elimination.finish_scores(sums["score"], valid) if weights else None
    if n_keep < N:
      names = sorted(carry)
      _, ctx_BxNxF, h_BxNxD, *kept = elimination.eliminate(
          sv_BxN, carry["valid"], carry["protect"], n_keep, ctx_BxNxF, h_BxNxD,
          *(carry[n] for n in names), method=cfg.selection)
      carry = dict(zip(names, kept))
    h_BxKxD = h_BxNxD + sa.SelfAttention.o(ctx_BxNxF)
    return self.sub[1](h_BxKxD), carry, sv_BxN

  def cross_kv(self, enc_BxSxD):
    """Returns (k, v) of the encoder states for this block's cross-attention."""
    a = self.sub[1].EncDecAttention
    return a.heads(a.k, enc_BxSxD), a.heads(a.v, enc_BxSxD)

  def decode(self, h_BxTxD, bias_BxHxTxS, allowed_BxTxS, cross_kv, cross_allowed_BxTxE,
             cache: dict | None = None, slot=None):
    """Returns (h_BxTxD, cache); with a cache, this step's k/v are written at ``slot`` first."""
    sa = self.sub[0]
    q, k, v = sa.qkv(h_BxTxD)
    if cache is not None:
      upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), slot, 1)
      cache = {"k": upd(cache["k"], k), "v": upd(cache["v"], v)}
      k, v = cache["k"], cache["v"]
    ctx, _ = sa.SelfAttention.attend(q, k, v, bias_BxHxTxS, allowed_BxTxS)
    h_BxTxD = h_BxTxD + sa.SelfAttention.o(ctx)
    h_BxTxD = self.sub[1](h_BxTxD, *cross_kv, cross_allowed_BxTxE)
    return self.sub[2](h_BxTxD), cache


class T5BlockScope(nn.Module):
  """HF's ``block/<i>`` scope; it holds the block as ``layer``."""
  config: T5Config
  has_relative_bias: bool
  decoder: bool

  def setup(self):
    self.layer = T5Block(self.config, self.has_relative_bias, self.decoder)


class T5Blocks(nn.Module):
  """HF's ``block`` scope: blocks "0", "1", ..."""
  config: T5Config
  decoder: bool

  def setup(self):
    n = self.config.num_decoder_layers if self.decoder else self.config.num_layers
    self.blocks = [T5BlockScope(self.config, i == 0, self.decoder, name=str(i)) for i in range(n)]


class T5Stack(nn.Module):
  """Encoder or decoder stack: blocks and ``final_layer_norm`` (the embedding is outside)."""
  config: T5Config
  decoder: bool

  def setup(self):
    self.block = T5Blocks(self.config, self.decoder)
    self.final_layer_norm = T5LayerNorm(self.config)

  def layers(self) -> list[T5Block]:
    return [b.layer for b in self.block.blocks]

  def encode(self, h_BxNxD, carry, keep_counts, with_scores):
    """Returns (h_BxKxD after final_layer_norm, carry, aux with per-layer positions/scores/ACC)."""
    blocks = self.layers()
    aux = {"scores": [], "acc": [], "positions": []}
    table = blocks[0].sub[0].SelfAttention.relative_attention_bias.embedding
    distance = self.config.relative_attention_max_distance
    bias = None
    for block, n_keep in zip(blocks, keep_counts):
      pos = carry["positions"]
      if self.config.attention_block > 0:  # each query block's bias, never the whole N x N
        bias_of = lambda start, size, pos=pos: t5_attention.position_bias(
            table, jax.lax.dynamic_slice_in_dim(pos, start, size, axis=1), pos, True, distance)
      else:
        if bias is None:  # positions change only where a layer eliminated
          bias = blocks[0].bias(pos, pos)
        bias_of = lambda start, size, bias=bias: bias
      valid_before, n_before = carry["valid"], h_BxNxD.shape[1]
      h_BxNxD, carry, sv_BxN = block.encode(h_BxNxD, carry, bias_of, n_keep, with_scores)
      bias = bias if n_keep == n_before else None
      aux["positions"].append(carry["positions"])
      if with_scores:
        aux["scores"].append(sv_BxN)
        aux["acc"].append(elimination.acc(sv_BxN, valid_before))
    return self.final_layer_norm(h_BxNxD), carry, aux


class T5ForConditionalGeneration(nn.Module):
  """T5 with the LM head; ``encode``, ``decode`` and ``decode_step`` are usable via ``method=``."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                           embedding_init=_normal(cfg.initializer_factor))
    self.encoder = T5Stack(cfg, decoder=False)
    self.decoder = T5Stack(cfg, decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              kernel_init=_normal(cfg.initializer_factor))

  def encode(self, input_ids, attention_mask=None, keep_counts: Sequence[int] | None = None,
             output_scores: bool = False) -> dict:
    """Returns a dict: last_hidden_state [B, N_L, D], mask, positions, layer_positions, ...

    ``keep_counts`` must be static (Python ints); ``mask`` and ``positions``
    give the validity and original position of each surviving encoder state.
    """
    cfg = self.config
    B, N = input_ids.shape
    counts = check_keep_counts(keep_counts, N, cfg.num_layers)
    valid_BxN = jnp.ones((B, N), bool) if attention_mask is None else attention_mask.astype(bool)
    # Nothing is protected: T5 has no [CLS], and the decoder reads every encoder
    # state through cross-attention, so no single token is the readout. Pads rank
    # below every valid token, so each row keeps at least one valid state.
    carry = {"valid": valid_BxN,
             "positions": jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)),
             "protect": jnp.zeros((B, N), bool)}
    h_BxKxD, carry, aux = self.encoder.encode(self.shared(input_ids), carry, counts, output_scores)
    out = {"last_hidden_state": h_BxKxD, "mask": carry["valid"],
           "positions": carry["positions"], "layer_positions": aux["positions"]}
    if output_scores:
      out["scores"], out["acc"] = aux["scores"], jnp.stack(aux["acc"], axis=-1)
    return out  # with output_scores, also "scores" (per layer SV_BxN) and "acc" [B, L]

  def head(self, h_BxND):
    """Returns float32 logits; a v1.0 (tied) model rescales by ``d_model**-0.5`` first."""
    cfg = self.config
    if cfg.scale_decoder_outputs:
      h_BxND = h_BxND * cfg.d_model ** -0.5
    if cfg.tie_word_embeddings:
      return self.shared.attend(h_BxND).astype(jnp.float32)
    return self.lm_head(h_BxND).astype(jnp.float32)

  def decode(self, decoder_input_ids, encoder_out, encoder_mask, decoder_attention_mask=None):
    """Returns logits [B, T, V] for teacher-forced decoder inputs over the kept encoder states."""
    B, T = decoder_input_ids.shape
    pos_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    allowed_BxTxT = pos_BxT[:, :, None] >= pos_BxT[:, None, :]
    if decoder_attention_mask is not None:
      allowed_BxTxT = allowed_BxTxT & decoder_attention_mask.astype(bool)[:, None, :]
    cross_BxTxS = jnp.broadcast_to(encoder_mask.astype(bool)[:, None, :],
                                   (B, T, encoder_mask.shape[1]))
    blocks = self.decoder.layers()
    bias = blocks[0].bias(pos_BxT, pos_BxT)
    h_BxTxD = self.shared(decoder_input_ids)
    for block in blocks:
      h_BxTxD, _ = block.decode(h_BxTxD, bias, allowed_BxTxT, block.cross_kv(encoder_out),
                                cross_BxTxS)
    return self.head(self.decoder.final_layer_norm(h_BxTxD))

  def cross_kv(self, encoder_out):
    """Returns per decoder block the (k, v) of the encoder states, computed once per prompt."""
    return [block.cross_kv(encoder_out) for block in self.decoder.layers()]

  def decode_step(self, token_B, t, caches, cross_kv, encoder_mask):
    """Returns (logits_BxV, caches) for the decoder token at position ``t`` (T cache slots)."""
    B, S = encoder_mask.shape
    T = caches[0]["k"].shape[1]
    pos_B1 = jnp.full((B, 1), t, jnp.int32)
    slots_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    allowed_Bx1xT = (slots_BxT <= t)[:, None, :]
    cross_Bx1xS = encoder_mask.astype(bool)[:, None, :]
    blocks = self.decoder.layers()
    bias = blocks[0].bias(pos_B1, slots_BxT)
    h_Bx1xD = self.shared(token_B[:, None])
    new = []
    for block, cache, kv in zip(blocks, caches, cross_kv):
      h_Bx1xD, cache = block.decode(h_Bx1xD, bias, allowed_Bx1xT, kv, cross_Bx1xS, cache, t)
      new.append(cache)
    return self.head(self.decoder.final_layer_norm(h_Bx1xD))[:, 0], new

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, keep_counts: Sequence[int] | None = None,
               output_scores: bool = False) -> dict:
    """Returns the encoder's dict plus ``logits`` [B, T, V] for ``decoder_input_ids``."""
    out = self.encode(input_ids, attention_mask, keep_counts, output_scores)
    out["logits"] = self.decode(decoder_input_ids, out["last_hidden_state"], out["mask"],
                                decoder_attention_mask)
    return out


def build(hf_config: dict, head: str = "seq2seq", **overrides: Any):
  """Returns ``(module, config, dummy_inputs)`` for an HF T5 config dict."""
  cfg = T5Config.from_hf(hf_config, **overrides)
  if head != "seq2seq":
    raise ValueError(f"T5 has no {head!r} head; use head='seq2seq'")
  dummy = lambda: (jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32),
                   jnp.zeros((1, 4), jnp.int32))
  return T5ForConditionalGeneration(cfg), cfg, dummy


def torch_name_map(name: str) -> tuple[tuple[str, ...], bool] | None:
  """Returns the Flax path of a torch T5 tensor and whether to transpose it (None: skip)."""
  parts = name.split(".")
  module, leaf = tuple(parts[:-1]), parts[-1]
  if module[-1:] == ("embed_tokens",):
    return None  # the encoder's and decoder's aliases of `shared`
  if module[-1] in ("shared", "relative_attention_bias"):
    return module + ("embedding",), False
  if module[-1] in ("layer_norm", "final_layer_norm"):
    return module + (leaf,), False
  if leaf == "weight":
    return module + ("kernel",), True  # torch Linear stores [out, in] (q/k/v/o, wi*, wo, lm_head)
  return module + (leaf,), False
