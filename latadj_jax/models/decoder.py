"""Flax (linen) decoder-only LMs: GPT-2, Llama, Mistral and Qwen2 as variants of one module.

A variant is a ``DecoderConfig`` (norm, MLP, learned or rotary positions,
biases, sliding window, grouped-query heads) plus a name map from its HF
checkpoint names to ours (``decoder_variants``). Our names follow HF's Llama:
``model/embed_tokens``, ``model/layers/0/self_attn/q_proj``,
``.../mlp/up_proj``, ``input_layernorm``, ``model/norm``, ``lm_head``.

Each layer attends over all ``N_{l-1}`` word-vectors; ``stack.run`` then keeps
``N_l`` of them before ``o_proj``, and the projection, residual and MLP run on
the kept ones only (docs/method.md section 4). Scores use eq. 8's causal
normalization, the last valid token always survives, and the causal mask
(with Mistral's sliding window) compares the carried original positions, so
a kept token never sees a later one. Rotary variants rotate each survivor by
its original position id; learned positions are added once, at the input.
Keys go into the KV cache already rotated, as in HF; ``generate`` decodes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models import attention, interface, rotary, stack
from latadj_jax.models.interface import Batch, Options, Output

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(interface.HFLayerNames):
  """Decoder hyperparameters, in HF Llama's names; ``decoder_variants`` reads each HF config."""
  model_type: str = "llama"                # the variant it was read from
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None   # None: as many as query heads (no GQA)
  head_dim_: int | None = None             # HF's ``head_dim``; None: hidden_size // heads
  max_position_embeddings: int = 2048
  norm: str = "rmsnorm"                    # "rmsnorm", or "layernorm" (GPT-2)
  norm_eps: float = 1e-6
  hidden_act: str = "silu"
  gated_mlp: bool = True                   # down(act(gate(x)) * up(x)); False: down(act(up(x)))
  positions: str = "rope"                  # "rope", or "learned" (GPT-2: added at the input)
  rope_theta: float = 10000.0
  rope_type: str = "default"               # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0        # llama3 only
  rope_high_freq_factor: float = 4.0       # llama3 only
  rope_original_max_positions: int = 8192  # llama3 only
  qkv_bias: bool = False                   # biases on q, k, v
  o_bias: bool = False                     # a bias on the output projection
  mlp_bias: bool = False
  sliding_window: int | None = None        # Mistral: keys at most this far back (original positions)
  scale_attn_weights: bool = True          # divide q.k by sqrt(head_dim)
  scale_attn_by_inverse_layer_idx: bool = False
  embd_pdrop: float = 0.0
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  cpu_compiler_options: tuple = ()         # (name, value) pairs for XLA:CPU (Model.jit_options)
  dtype: str = "float32"                   # activations; parameters stay float32
  selection: str = "gather"                # "gather" or "onehot" token selection
  survivors: str = "score"                 # elimination.CAUSAL_RULES: score (eq. 8), window, ...
  score_window: int = 32                   # "window": score by the last this many queries
  keep_sinks: int = 0                      # the first this many tokens always survive
  keep_recent: int = 0                     # the last this many tokens always survive
  score_pool: int = 0                      # score/window: max-pool the scores over K neighbours
  attention_block: int = 0                 # attend this many queries at a time (0: all at once)

  DROPOUT_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")

  def __post_init__(self):
    elimination.check_causal_rule(self.survivors, self.score_window, self.keep_sinks,
                                  self.keep_recent, self.score_pool)
    for field, value, known in (("norm", self.norm, ("rmsnorm", "layernorm")),
                                ("positions", self.positions, ("rope", "learned")),
                                ("rope_type", self.rope_type, ROPE_TYPES)):
      if value not in known:
        raise ValueError(f"{field} {value!r} is not supported; supported: {known}")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                       f"{self.kv_heads} key/value heads")

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def head_dim(self) -> int:
    return self.head_dim_ or self.hidden_size // self.num_attention_heads



def _dense(cfg: DecoderConfig, features: int, bias: bool, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=cfg.dtype, name=name,
                  kernel_init=nn.initializers.normal(cfg.initializer_range))


class RMSNorm(nn.Module):
  """HF's LlamaRMSNorm: normalise in float32, then scale."""
  eps: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxNxD):
    scale_D = self.param("scale", nn.initializers.ones, (x_BxNxD.shape[-1],))
    x32 = x_BxNxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale_D.astype(self.dtype) * normed.astype(self.dtype)


def _norm(cfg: DecoderConfig) -> nn.Module:
  if cfg.norm == "layernorm":
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype)
  return RMSNorm(cfg.norm_eps, cfg.dtype)


class DecoderAttention(nn.Module):
  """Holds q/k/v/o; the layer calls its steps so the stack can eliminate in between."""
  config: DecoderConfig
  layer_idx: int = 0

  def setup(self):
    cfg = self.config
    self.q_proj = _dense(cfg, cfg.num_attention_heads * cfg.head_dim, cfg.qkv_bias)
    self.k_proj = _dense(cfg, cfg.kv_heads * cfg.head_dim, cfg.qkv_bias)
    self.v_proj = _dense(cfg, cfg.kv_heads * cfg.head_dim, cfg.qkv_bias)
    self.o_proj = _dense(cfg, cfg.hidden_size, cfg.o_bias)
    self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

  def qkv(self, a_BxNxD, pos_ids_BxN):
    """Returns q BxNxHxK and k, v BxNxGxK; rotary variants rotate q and k by their position ids."""
    cfg = self.config
    B, N, _ = a_BxNxD.shape
    q = self.q_proj(a_BxNxD).reshape(B, N, cfg.num_attention_heads, cfg.head_dim)
    k = self.k_proj(a_BxNxD).reshape(B, N, cfg.kv_heads, cfg.head_dim)
    v = self.v_proj(a_BxNxD).reshape(B, N, cfg.kv_heads, cfg.head_dim)
    if cfg.positions == "rope":
      cos, sin = rotary.rope_cos_sin(pos_ids_BxN, rotary.rope_inv_freq(cfg))
      q, k = rotary.apply_rope(q, cos, sin), rotary.apply_rope(k, cos, sin)
    return q, k, v

  def attend(self, q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, pos_q_BxQ, pos_k_BxS, valid_k_BxS,
             deterministic: bool, queries=None, block: int = 0):
    """Returns (ctx_BxQxD with heads concatenated, {name: column sums BxS} for ``queries``).

    ``attention.query_blocked`` runs it ``block`` queries at a time (0: all at
    once); dropout applies after the column sums have read the probabilities.
    """
    cfg = self.config
    scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= self.layer_idx + 1
    rng = None if deterministic or cfg.attn_pdrop <= 0 else self.make_rng("dropout")
    dropout = attention.block_dropout(rng, cfg.attn_pdrop)

    def probs_of(start, size):
      rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
      allowed = attention.causal_allowed(rows(pos_q_BxQ), pos_k_BxS, valid_k_BxS,
                                         cfg.sliding_window)
      return attention.gqa_probs(rows(q_BxQxHxK), k_BxSxGxK, allowed, scale)

    def context_of(probs, start, size):
      return attention.gqa_context(dropout(probs, start).astype(cfg.dtype), v_BxSxGxK)

    return attention.query_blocked(probs_of, context_of, q_BxQxHxK.shape[1], block, queries)

  def project(self, ctx_BxKxD, deterministic: bool):
    """Returns the output projection of the (kept) attention context."""
    return self.resid_dropout(self.o_proj(ctx_BxKxD), deterministic=deterministic)


class DecoderMLP(nn.Module):
  """``down(act(gate(x)) * up(x))`` (SwiGLU), or ``down(act(up(x)))`` (GPT-2)."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x_BxNxD, deterministic: bool):
    cfg = self.config
    act = interface.activation(cfg.hidden_act)
    up_BxNxF = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x_BxNxD)
    if cfg.gated_mlp:
      f_BxNxF = act(_dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x_BxNxD)) * up_BxNxF
    else:
      f_BxNxF = act(up_BxNxF)
    y_BxNxD = _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(f_BxNxF)
    return nn.Dropout(cfg.resid_pdrop)(y_BxNxD, deterministic=deterministic)


class DecoderLayer(nn.Module):
  """Pre-norm layer, split at the Eliminate point for ``stack.run``; ``decode`` for one new token."""
  config: DecoderConfig
  layer_idx: int = 0

  def setup(self):
    cfg = self.config
    self.input_layernorm = _norm(cfg)
    self.self_attn = DecoderAttention(cfg, self.layer_idx)
    self.post_attention_layernorm = _norm(cfg)
    self.mlp = DecoderMLP(cfg)

  def attend(self, h_BxNxD, carry: dict, queries: dict, deterministic: bool):
    """Returns (ctx, column sums, the k/v/valid/positions this layer attended over)."""
    q, k, v = self.self_attn.qkv(self.input_layernorm(h_BxNxD), carry.get("pos_ids"))
    valid, pos = carry["valid"], carry["positions"]
    ctx_BxNxD, sums = self.self_attn.attend(q, k, v, pos, pos, valid, deterministic, queries,
                                            self.config.attention_block)
    return ctx_BxNxD, sums, {"k": k, "v": v, "valid": valid, "positions": pos}

  def finish(self, h_BxKxD, ctx_BxKxD, deterministic: bool):
    h_BxKxD = h_BxKxD + self.self_attn.project(ctx_BxKxD, deterministic)
    return h_BxKxD + self.mlp(self.post_attention_layernorm(h_BxKxD), deterministic)

  def decode(self, h_Bx1xD, cache: dict, slot, pos_B, pos_id_B):
    """Returns (h_Bx1xD, cache with this token's (rotated) k and its v written at ``slot``)."""
    q, k, v = self.self_attn.qkv(self.input_layernorm(h_Bx1xD), pos_id_B[:, None])
    upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), slot, 1)
    cache = {"k": upd(cache["k"], k), "v": upd(cache["v"], v),
             "valid": upd(cache["valid"], jnp.ones_like(pos_B, bool)[:, None]),
             "positions": upd(cache["positions"], pos_B[:, None])}
    ctx_Bx1xD, _ = self.self_attn.attend(q, cache["k"], cache["v"], pos_B[:, None],
                                         cache["positions"], cache["valid"], True)
    return self.finish(h_Bx1xD, ctx_Bx1xD, True), cache


class DecoderModel(nn.Module):
  """The body: token (and learned position) embeddings, layers with Sort+Eliminate, final norm."""
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                                 dtype=cfg.dtype)
    if cfg.positions == "learned":
      self.embed_positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                      embedding_init=init, dtype=cfg.dtype)
    self.dropout = nn.Dropout(cfg.embd_pdrop)
    self.layers = stack.Layers(DecoderLayer, cfg, cfg.num_hidden_layers)
    self.norm = _norm(cfg)

  def embed(self, ids_BxN, pos_ids_BxN, embeds_BxNxD=None):
    x_BxNxD = self.embed_tokens(ids_BxN) if embeds_BxNxD is None else embeds_BxNxD.astype(self.config.dtype)
    if self.config.positions == "learned":  # added once; later layers need only the carried positions
      x_BxNxD = x_BxNxD + self.embed_positions(pos_ids_BxN)
    return x_BxNxD

  def __call__(self, batch: Batch, keep_counts: Sequence[int] | None = None,
               options: Options = interface.INFERENCE) -> Output:
    """Returns the survivors' states after the final norm; ``keep_counts`` static (Python ints)."""
    cfg = self.config
    B, N = (batch.input_ids if batch.inputs_embeds is None else batch.inputs_embeds).shape[:2]
    counts = interface.check_keep_counts(keep_counts, N, cfg.num_hidden_layers)
    valid_BxN = interface.valid_of(batch, B, N)
    pos_ids_BxN = (interface.default_position_ids(valid_BxN) if batch.position_ids is None
                   else jnp.asarray(batch.position_ids, jnp.int32))
    h_BxNxD = self.dropout(self.embed(batch.input_ids, pos_ids_BxN, batch.inputs_embeds),
                           deterministic=not options.train)
    protect = elimination.causal_protect(valid_BxN, cfg.keep_sinks, cfg.keep_recent)
    carry = interface.start_carry(
        valid_BxN, protect, **({"pos_ids": pos_ids_BxN} if cfg.positions == "rope" else {}))
    rng = self.make_rng("dropout") if options.train and cfg.survivors == "random" else None
    h_BxKxD, carry, aux = stack.run(self.layers.layers, h_BxNxD, carry, counts,
                                    stack.Survivors.of(cfg, causal=True), options, rng)
    h_BxKxD = self.norm(h_BxKxD)
    return Output(
        last_hidden_state=h_BxKxD, mask=carry["valid"], positions=carry["positions"],
        layer_positions=tuple(aux["positions"]),
        scores=tuple(aux["scores"]) if options.scores else None,
        acc=jnp.stack(aux["acc"], axis=-1) if options.scores else None,
        kv=tuple(aux["kv"]) if options.kv else None,
        # As in HF, the last entry is after the final norm.
        hidden_states=tuple(aux["hidden"][:-1]) + (h_BxKxD,) if options.hidden else None)

  def decode(self, token_B, caches, slot_offsets, pos_B, pos_id_B):
    """Returns (h_BxD after the final norm, caches); layer l writes at ``slot_offsets[l]``."""
    h_Bx1xD = self.embed(token_B[:, None], pos_id_B[:, None])
    new = []
    for layer, cache, slot in zip(self.layers.layers, caches, slot_offsets):
      h_Bx1xD, cache = layer.decode(h_Bx1xD, cache, slot, pos_B, pos_id_B)
      new.append(cache)
    return self.norm(h_Bx1xD)[:, 0], new


class DecoderLM(nn.Module):
  """The body plus the LM head (``lm_head``, or tied to ``embed_tokens``)."""
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.model = DecoderModel(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, False)

  def head(self, h_BxND):
    """Returns float32 logits for hidden states after the body's final norm."""
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.attend(h_BxND).astype(jnp.float32)
    return self.lm_head(h_BxND).astype(jnp.float32)

  def __call__(self, batch: Batch, keep_counts: Sequence[int] | None = None,
               options: Options = interface.INFERENCE) -> Output:
    """Returns the body's output with ``logits`` [B, N_L, V] at the surviving positions."""
    out = self.model(batch, keep_counts, options)
    return out.replace(logits=self.head(out.last_hidden_state))

  def prefill(self, batch: Batch, keep_counts: Sequence[int] | None = None):
    """Returns (logits_BxV at each row's last valid token, the body's output with ``kv``).

    Only the last token's logits are computed: that is all the first new
    token needs, and the LM head over every position would dominate the cost.
    """
    out = self.model(batch, keep_counts, Options(kv=True))
    last_BxK = elimination.last_valid_mask(out.mask)
    h_BxD = jnp.einsum("bk,bkd->bd", last_BxK.astype(out.last_hidden_state.dtype),
                       out.last_hidden_state)
    return self.head(h_BxD), out

  def decode(self, token_B, caches, slot_offsets, pos_B, pos_id_B):
    """Returns (logits_BxV, caches) for one new token per row.

    ``pos_B`` is its causal (original) position, ``pos_id_B`` its position id
    (the learned position embedding's index, or the RoPE position).
    """
    h_BxD, caches = self.model.decode(token_B, caches, slot_offsets, pos_B, pos_id_B)
    return self.head(h_BxD), caches
