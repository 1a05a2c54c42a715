"""Flax (linen) T5 encoder-decoder, its encoder run by the one eliminating stack.

Parameter names mirror Hugging Face's Flax T5 (``shared/embedding``,
``encoder/block/0/layer/0/SelfAttention/q/kernel``, ``layer_norm/weight``,
``decoder/block/0/layer/1/EncDecAttention``, ``lm_head/kernel``), so a
``flax_model.msgpack`` loads as it is. It covers T5 v1.0 (ReLU FFN, tied head
rescaled by ``d_model**-0.5``) and v1.1/Flan-T5 (gated-GELU FFN, untied head).
It is inference-only (no dropout): the paper applies the method to Flan-T5
with no training (its Table VI).

Each encoder block attends over all ``N_{l-1}`` word-vectors (``attend``); then
``stack.run`` keeps ``N_l`` of them after the heads are concatenated, before
``o``; ``o``, the residual and the FFN run on the kept ones (``finish``;
docs/method.md section 4). The relative
position bias of every layer is computed from the carried original positions,
so a kept pair gets the bias of its original distance. The decoder's
cross-attention sees exactly the surviving encoder states. The relative
position bias and the attention module are in ``t5_layers``; greedy
generation with a KV cache is in ``t5_generate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.models import attention, checkpoints, interface, stack, t5_layers
from latadj_jax.models.interface import Batch, Options, Output
from latadj_jax.models.t5_layers import (T5LayerCrossAttention, T5LayerFF, T5LayerNorm,
                                          T5LayerSelfAttention)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 hyperparameters (the fields of HF's ``T5Config`` that the model uses)."""
  vocab_size: int = 32128
  d_model: int = 512                    # the residual stream's width
  d_kv: int = 64                        # one head's width (heads * d_kv need not be d_model)
  d_ff: int = 2048                      # the feed-forward's inner width
  num_layers: int = 6                   # encoder blocks: the eliminating layers
  num_decoder_layers: int | None = None  # None: as many as the encoder's
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
  survivors: str = "score"        # "score" (the method), "first" or "random": Table VII ablations
  attention_block: int = 0        # encoder: attend this many queries at a time (0: all at once)

  DROPOUT_FIELDS = ()             # inference only

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "T5Config":
    """Returns a T5Config from an HF config object or dict, with overrides applied."""
    src = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    kwargs = {k: v for k, v in interface.fields_from_hf(cls, src).items() if v is not None}
    if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
      kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    return cls(**{**kwargs, **overrides})

  @property
  def max_positions(self) -> None:
    return None  # relative positions: no limit of the model's own

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act(self) -> str:
    # HF maps "gated-gelu" to the tanh approximation, for backward compatibility.
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]


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

  def attend(self, h_BxNxD, carry: dict, queries: dict, bias_of: Callable):
    """Returns (ctx_BxNxF, column sums, None): the encoder self-attention, for ``stack.run``.

    ``bias_of(start, size)`` returns the position bias of queries ``start ..
    start+size-1``, BxHxsizexN; the attention runs ``attention_block`` queries at a
    time (0: all at once).
    """
    cfg, sa = self.config, self.sub[0]
    q, k, v = sa.qkv(h_BxNxD)
    valid = carry["valid"]
    B, N = valid.shape

    def probs_of(start, size):
      rows = jax.lax.dynamic_slice_in_dim(q, start, size, axis=1)
      allowed = jnp.broadcast_to(valid[:, None, :], (B, size, N))
      return t5_layers.attention_probs(rows, k, bias_of(start, size), allowed)

    def context_of(probs, start, size):
      ctx = attention.context(probs.astype(cfg.dtype), v)
      return ctx.reshape(ctx.shape[:2] + (-1,))

    ctx_BxNxF, sums = attention.query_blocked(probs_of, context_of, N, cfg.attention_block,
                                              queries)
    return ctx_BxNxF, sums, None

  def finish(self, h_BxKxD, ctx_BxKxF):
    return self.sub[1](h_BxKxD + self.sub[0].SelfAttention.o(ctx_BxKxF))

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

  def encoder_layers(self) -> list["EncoderLayer"]:
    """Returns the blocks with the relative-bias table they share (block 0 holds it, as in HF)."""
    blocks = self.layers()
    table = blocks[0].sub[0].SelfAttention.relative_attention_bias.embedding
    biases = {}  # one bias per positions array: they change only where a layer eliminated
    return [EncoderLayer(b, table, self.config.relative_attention_max_distance,
                         self.config.attention_block, biases) for b in blocks]


@dataclasses.dataclass(frozen=True)
class EncoderLayer:
  """An encoder block as ``stack.run`` sees it: with the stack's shared position bias."""
  block: T5Block
  table: jax.Array
  max_distance: int
  query_block: int
  biases: dict

  def attend(self, h_BxNxD, carry: dict, queries: dict, deterministic: bool):
    pos = carry["positions"]
    if self.query_block > 0:  # each query block's bias, never the whole N x N
      bias_of = lambda start, size: t5_layers.position_bias(
          self.table, jax.lax.dynamic_slice_in_dim(pos, start, size, axis=1), pos, True,
          self.max_distance)
    else:
      if id(pos) not in self.biases:
        self.biases.clear()
        self.biases[id(pos)] = t5_layers.position_bias(self.table, pos, pos, True,
                                                          self.max_distance)
      bias = self.biases[id(pos)]
      bias_of = lambda start, size: bias
    return self.block.attend(h_BxNxD, carry, queries, bias_of)

  def finish(self, h_BxKxD, ctx_BxKxF, deterministic: bool):
    return self.block.finish(h_BxKxD, ctx_BxKxF)


class T5ForConditionalGeneration(nn.Module):
  """T5 with the LM head; ``encode``, ``decode`` and ``decode_step`` are usable via ``method=``."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                           embedding_init=nn.initializers.normal(cfg.initializer_factor))
    self.encoder = T5Stack(cfg, decoder=False)
    self.decoder = T5Stack(cfg, decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              kernel_init=nn.initializers.normal(cfg.initializer_factor))

  def encode(self, batch: Batch, keep_counts: Sequence[int] | None = None,
             options: Options = interface.INFERENCE) -> Output:
    """Returns the surviving encoder states (after ``final_layer_norm``); counts static ints."""
    cfg = self.config
    B, N = batch.input_ids.shape
    counts = interface.check_keep_counts(keep_counts, N, cfg.num_layers)
    valid_BxN = interface.valid_of(batch, B, N)
    # Nothing is protected: T5 has no [CLS], and the decoder reads every encoder
    # state through cross-attention, so no single token is the readout. Pads rank
    # below every valid token, so each row keeps at least one valid state.
    carry = interface.start_carry(valid_BxN, jnp.zeros((B, N), bool))
    h_BxKxD, carry, aux = stack.run(self.encoder.encoder_layers(), self.shared(batch.input_ids),
                                    carry, counts, stack.Survivors.of(cfg, causal=False), options)
    return Output(
        last_hidden_state=self.encoder.final_layer_norm(h_BxKxD), mask=carry["valid"],
        positions=carry["positions"], layer_positions=tuple(aux["positions"]),
        scores=tuple(aux["scores"]) if options.scores else None,
        acc=jnp.stack(aux["acc"], axis=-1) if options.scores else None,
        hidden_states=tuple(aux["hidden"]) if options.hidden else None)

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

  def __call__(self, batch: Batch, keep_counts: Sequence[int] | None = None,
               options: Options = interface.INFERENCE) -> Output:
    """Returns the encoder's output, with ``logits`` [B, T, V] when the batch has decoder inputs."""
    out = self.encode(batch, keep_counts, options)
    if batch.decoder_input_ids is None:
      return out
    return out.replace(logits=self.decode(batch.decoder_input_ids, out.last_hidden_state,
                                          out.mask, batch.decoder_attention_mask))


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


FAMILY = interface.register(interface.Family(
    name="t5", kind="seq2seq", config_from_hf=T5Config.from_hf,
    heads={"seq2seq": T5ForConditionalGeneration}, name_map=torch_name_map,
    to_torch=lambda params: checkpoints.invert_name_map(params, torch_name_map),
    base_prefix="", checkpoint_holds_all=True,
    hf_classes={"seq2seq": "T5ForConditionalGeneration"},
    required_fields=("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")), "t5")
