"""Flax (linen) GPT-2 LM head model with causal Sort+Eliminate layers.

Parameter names and layouts mirror Hugging Face's Flax GPT-2
(``transformer/h/0/attn/c_attn/kernel``, ``ln_1``, ``mlp/c_fc``, ...), so a
``flax_model.msgpack`` loads as it is. The LM head is tied to ``wte``.

Each block attends over all ``N_{l-1}`` word-vectors, then Sort+Eliminate keeps
``N_l`` of them after the heads are concatenated, before ``attn/c_proj``; the
projection, residual, ``ln_2`` and MLP run on the kept ones only (METHOD.md
section 4). Scores use the causal normalization (section 1, eq. 8), the last
valid token is always kept, and the causal mask compares the carried original
positions, so a kept token never sees a later one. The LM head, its prefill
and decode are ``lm_head.CausalLM``'s; generation with a KV cache is in
``gpt2_generate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models import attention
from latadj_jax.models.bert import activation, check_keep_counts
from latadj_jax.models.lm_head import CausalLM

MODEL_TYPES = ("gpt2",)
BASE_PREFIX = "transformer"  # the body's scope in GPT2LMHeadModel


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2 hyperparameters (the fields of HF's ``GPT2Config`` that the model uses)."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  bos_token_id: int | None = 50256
  eos_token_id: int | None = 50256
  dtype: str = "float32"          # activations; parameters stay float32
  selection: str = "gather"       # "gather" or "onehot" token selection
  survivors: str = "score"        # elimination.CAUSAL_RULES: score (eq. 8), window, first, random, last
  score_window: int = 32          # "window": score by the last this many queries (SnapKV)
  keep_sinks: int = 0             # the first this many tokens always survive (StreamingLLM)
  keep_recent: int = 0            # the last this many tokens always survive
  score_pool: int = 0             # score/window: max-pool the scores over this many neighbours
  attention_block: int = 0        # attend this many queries at a time (0: all at once); see attention.py

  def __post_init__(self):
    elimination.check_causal_rule(self.survivors, self.score_window, self.keep_sinks,
                                  self.keep_recent, self.score_pool)

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "GPT2Config":
    """Returns a GPT2Config from an HF config object or dict, with overrides applied."""
    src = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if src.get("reorder_and_upcast_attn") or src.get("add_cross_attention"):
      raise ValueError("reorder_and_upcast_attn and add_cross_attention are not supported")
    # HF's "dtype" is the checkpoint's storage type, not our activation type.
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: v for k, v in src.items() if k in fields}
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd


def causal_allowed(pos_q_BxQ: jax.Array, pos_k_BxK: jax.Array,
                   valid_k_BxK: jax.Array) -> jax.Array:
  """Returns the BxQxK mask of keys each query may see: earlier-or-same original position, not a pad.

  Slots are renumbered by elimination, so causality must compare the carried
  original positions, never slot indices.
  """
  return (pos_q_BxQ[:, :, None] >= pos_k_BxK[:, None, :]) & valid_k_BxK[:, None, :].astype(bool)


def attention_probs(q_BxQxHxK: jax.Array, k_BxSxHxK: jax.Array, allowed_BxQxS: jax.Array,
                    scale: float) -> jax.Array:
  """Returns the float32 attention probabilities BxHxQxS (masked keys get exactly 0)."""
  logits = attention.logits(q_BxQxHxK, k_BxSxHxK).astype(jnp.float32) * scale
  # `where`, not an added bias: a fully masked row (a left pad) stays finite.
  logits = jnp.where(allowed_BxQxS[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.where(allowed_BxQxS[:, None], probs, 0.0)


class Conv1D(nn.Module):
  """HF's FlaxConv1D: a dense layer whose kernel is stored [out, in]."""
  features: int
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BxNxI):
    cfg = self.config
    kernel_OxI = self.param("kernel", nn.initializers.normal(cfg.initializer_range),
                            (self.features, x_BxNxI.shape[-1]))
    bias_O = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jnp.einsum("...i,oi->...o", x_BxNxI.astype(cfg.dtype), kernel_OxI.astype(cfg.dtype))
    return y + bias_O.astype(cfg.dtype)


class GPT2Attention(nn.Module):
  """Holds ``c_attn``/``c_proj``; the block calls its steps so it can eliminate in between."""
  config: GPT2Config
  layer_idx: int = 0

  def setup(self):
    cfg = self.config
    self.c_attn = Conv1D(3 * cfg.n_embd, cfg)
    self.c_proj = Conv1D(cfg.n_embd, cfg)
    self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

  def qkv(self, a_BxNxD):
    """Returns q, k, v, each BxNxHxK."""
    cfg = self.config
    B, N, _ = a_BxNxD.shape
    q, k, v = jnp.split(self.c_attn(a_BxNxD), 3, axis=-1)
    return tuple(x.reshape(B, N, cfg.n_head, cfg.head_dim) for x in (q, k, v))

  def attend(self, q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, pos_q_BxQ, pos_k_BxS, valid_k_BxS,
             deterministic: bool, weights=None, block: int = 0):
    """Returns (ctx_BxQxD with heads concatenated, {name: column sums BxS} for ``weights``).

    Causal over the carried original positions; ``attention.query_blocked``
    runs it ``block`` queries at a time (0: all at once), and dropout applies
    after the column sums have read the probabilities.
    """
    cfg = self.config
    scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= self.layer_idx + 1
    rng = None if deterministic or cfg.attn_pdrop <= 0 else self.make_rng("dropout")
    dropout = attention.block_dropout(rng, cfg.attn_pdrop)

    def probs_of(start, size):
      rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
      allowed = causal_allowed(rows(pos_q_BxQ), pos_k_BxS, valid_k_BxS)
      return attention_probs(rows(q_BxQxHxK), k_BxSxHxK, allowed, scale)

    def context_of(probs, start, size):
      ctx = attention.context(dropout(probs, start).astype(cfg.dtype), v_BxSxHxK)
      return ctx.reshape(ctx.shape[:2] + (-1,))

    Q = q_BxQxHxK.shape[1]
    return attention.query_blocked(probs_of, context_of, Q, block, weights)

  def project(self, ctx_BxKxD, deterministic: bool):
    """Returns the output projection of the (kept) attention context."""
    return self.resid_dropout(self.c_proj(ctx_BxKxD), deterministic=deterministic)


class GPT2MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BxNxD, deterministic: bool):
    cfg = self.config
    f_BxNxF = activation(cfg.activation_function)(Conv1D(cfg.inner_dim, cfg, name="c_fc")(x_BxNxD))
    y_BxNxD = Conv1D(cfg.n_embd, cfg, name="c_proj")(f_BxNxF)
    return nn.Dropout(cfg.resid_pdrop)(y_BxNxD, deterministic=deterministic)


class GPT2Block(nn.Module):
  """Pre-LN block: attention over N_{l-1}, Sort+Eliminate, then projection and MLP on N_l."""
  config: GPT2Config
  layer_idx: int = 0

  def setup(self):
    cfg = self.config
    ln = lambda: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype)
    self.ln_1, self.ln_2 = ln(), ln()
    self.attn = GPT2Attention(cfg, self.layer_idx)
    self.mlp = GPT2MLP(cfg)

  def _finish(self, h_BxKxD, ctx_BxKxD, deterministic):
    h_BxKxD = h_BxKxD + self.attn.project(ctx_BxKxD, deterministic)
    return h_BxKxD + self.mlp(self.ln_2(h_BxKxD), deterministic)

  def __call__(self, h_BxNxD, carry: dict, n_keep: int, deterministic: bool, with_scores: bool):
    """Returns (h_BxKxD, carry at the kept positions, SV_BxN or None, kv of the N attended)."""
    cfg = self.config
    q, k, v = self.attn.qkv(self.ln_1(h_BxNxD))
    valid, pos = carry["valid"], carry["positions"]
    weights = elimination.score_queries(cfg.survivors, valid, cfg.score_window, with_scores,
                                        n_keep < valid.shape[1])
    ctx_BxNxD, sums = self.attn.attend(q, k, v, pos, pos, valid, deterministic, weights,
                                       cfg.attention_block)
    # What this layer attended over is what its KV cache must hold.
    kv = {"k": k, "v": v, "valid": valid, "positions": pos}
    sv_BxN, carry, ctx_BxNxD, h_BxNxD = elimination.causal_step(
        sums, carry, n_keep, ctx_BxNxD, h_BxNxD, rule=cfg.survivors,
        window=cfg.score_window, with_scores=with_scores, method=cfg.selection,
        pool=cfg.score_pool)
    return self._finish(h_BxNxD, ctx_BxNxD, deterministic), carry, sv_BxN, kv

  def decode(self, h_Bx1xD, cache: dict, slot, pos_B):
    """Returns (h_Bx1xD, cache with this token's k/v written at ``slot``)."""
    q, k, v = self.attn.qkv(self.ln_1(h_Bx1xD))
    upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), slot, 1)
    cache = {"k": upd(cache["k"], k), "v": upd(cache["v"], v),
             "valid": upd(cache["valid"], jnp.ones_like(pos_B, bool)[:, None]),
             "positions": upd(cache["positions"], pos_B[:, None])}
    ctx_Bx1xD, _ = self.attn.attend(q, cache["k"], cache["v"], pos_B[:, None], cache["positions"],
                                    cache["valid"], True)
    return self._finish(h_Bx1xD, ctx_Bx1xD, True), cache


class GPT2BlockCollection(nn.Module):
  config: GPT2Config

  def setup(self):
    self.blocks = [GPT2Block(self.config, i, name=str(i)) for i in range(self.config.n_layer)]

  def __call__(self, h_BxNxD, carry, keep_counts, deterministic, with_scores, with_hidden):
    """Returns (h_BxKxD, carry, aux) with per-layer positions, kv, scores, ACC, hidden states."""
    aux = {"hidden_states": [h_BxNxD], "scores": [], "acc": [], "positions": [], "kv": []}
    for block, n_keep in zip(self.blocks, keep_counts):
      valid_before = carry["valid"]
      h_BxNxD, carry, sv_BxN, kv = block(h_BxNxD, carry, n_keep, deterministic, with_scores)
      aux["positions"].append(carry["positions"])
      aux["kv"].append(kv)
      if with_hidden:
        aux["hidden_states"].append(h_BxNxD)
      if with_scores:
        aux["scores"].append(sv_BxN)
        aux["acc"].append(elimination.acc(sv_BxN, valid_before))
    return h_BxNxD, carry, aux

  def decode(self, h_Bx1xD, caches, slot_offsets, pos_B):
    """Returns (h_Bx1xD, caches); layer l writes at ``slot_offsets[l]``."""
    new = []
    for block, cache, slot in zip(self.blocks, caches, slot_offsets):
      h_Bx1xD, cache = block.decode(h_Bx1xD, cache, slot, pos_B)
      new.append(cache)
    return h_Bx1xD, new


def default_position_ids(valid_BxN: jax.Array) -> jax.Array:
  """Returns position-embedding ids: 0, 1, ... over each row's valid tokens (HF generate's rule).

  For right padding or none this is ``arange``; a left-padded row starts at 0
  at its first valid token.
  """
  return jnp.maximum(jnp.cumsum(valid_BxN.astype(jnp.int32), axis=-1) - 1, 0)


class GPT2Module(nn.Module):
  """GPT-2 body: embeddings, blocks with Sort+Eliminate, ``ln_f`` (HF ``FlaxGPT2Module`` names)."""
  config: GPT2Config

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, dtype=cfg.dtype)
    self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, dtype=cfg.dtype)
    self.dropout = nn.Dropout(cfg.embd_pdrop)
    self.h = GPT2BlockCollection(cfg)
    self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype)

  def __call__(self, input_ids, attention_mask=None, keep_counts: Sequence[int] | None = None,
               deterministic: bool = True, output_scores: bool = False,
               output_hidden_states: bool = False, inputs_embeds=None, position_ids=None,
               output_kv: bool = False):
    """Returns a dict: last_hidden_state [B, N_L, D], mask, positions, layer_positions, ...

    ``keep_counts`` must be static (Python ints). ``positions`` holds the
    original position of each survivor; ``inputs_embeds`` (token embeddings,
    before position embeddings) replaces ``input_ids`` when given.
    """
    cfg = self.config
    x_BxNxD = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
    B, N = x_BxNxD.shape[:2]
    counts = check_keep_counts(keep_counts, N, cfg.n_layer)
    valid_BxN = (jnp.ones((B, N), bool) if attention_mask is None
                 else attention_mask.astype(bool))
    if position_ids is None:
      position_ids = default_position_ids(valid_BxN)
    # Position embeddings go in once, here; afterwards only the carried positions matter.
    h_BxNxD = self.dropout(x_BxNxD + self.wpe(position_ids), deterministic=deterministic)
    carry = {"valid": valid_BxN,
             "positions": jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)),
             "protect": elimination.causal_protect(valid_BxN, cfg.keep_sinks, cfg.keep_recent)}
    h_BxKxD, carry, aux = self.h(h_BxNxD, carry, counts, deterministic, output_scores,
                                 output_hidden_states)
    h_BxKxD = self.ln_f(h_BxKxD)
    out = {"last_hidden_state": h_BxKxD, "mask": carry["valid"],
           "positions": carry["positions"], "layer_positions": aux["positions"]}
    if output_hidden_states:
      # As in HF, the last entry is after ln_f.
      out["hidden_states"] = aux["hidden_states"][:-1] + [h_BxKxD]
    if output_scores:
      out["scores"], out["acc"] = aux["scores"], jnp.stack(aux["acc"], axis=-1)
    if output_kv:
      out["kv"] = aux["kv"]
    return out

  def decode(self, token_B, caches, slot_offsets, pos_B, pos_id_B):
    """Returns (h_BxD after ln_f, caches) for one new token per row."""
    x_Bx1xD = self.wte(token_B[:, None]) + self.wpe(pos_id_B[:, None])
    h_Bx1xD, caches = self.h.decode(x_Bx1xD, caches, slot_offsets, pos_B)
    return self.ln_f(h_Bx1xD)[:, 0], caches


class GPT2LMHeadModel(CausalLM):
  """GPT-2 with the LM head, tied to ``wte`` unless ``tie_word_embeddings`` is false."""
  config: GPT2Config
  BODY = GPT2Module
  BODY_SCOPE = BASE_PREFIX
  EMBEDDING = "wte"


def build(hf_config: dict, head: str = "lm", **overrides: Any):
  """Returns ``(module, config, dummy_inputs)`` for an HF GPT-2 config dict."""
  cfg = GPT2Config.from_hf(hf_config, **overrides)
  heads = {"lm": GPT2LMHeadModel, "none": GPT2Module}
  if head not in heads:
    raise ValueError(f"GPT-2 has no {head!r} head; use one of {sorted(heads)}")
  return heads[head](cfg), cfg, lambda: (jnp.ones((1, 8), jnp.int32),)


def torch_name_map(name: str) -> tuple[tuple[str, ...], bool] | None:
  """Returns the Flax path of a torch GPT-2 tensor and whether to transpose it (None: skip).

  Torch's Conv1D stores [in, out]; HF's FlaxConv1D (mirrored here) stores
  [out, in], so Conv1D weights are transposed, as HF's own converter does.
  """
  parts = name.split(".")
  module, leaf = tuple(parts[:-1]), parts[-1]
  if module[-1:] == ("attn",) and leaf in ("bias", "masked_bias"):
    return None  # causal-mask buffers, not parameters
  if module[-1:] == ("lm_head",):
    # nn.Dense stores [in, out]. A tied model has no lm_head parameter, so a
    # checkpoint that still holds the tensor leaves it in the load report's unused list.
    return ("lm_head", "kernel"), True
  if module[-1] in ("wte", "wpe"):
    return module + ("embedding",), False
  if module[-1].startswith("ln_"):
    return module + ({"weight": "scale"}.get(leaf, leaf),), False
  if module[-1] in ("c_attn", "c_proj", "c_fc"):
    return module + ({"weight": "kernel"}.get(leaf, leaf),), leaf == "weight"
  return module + (leaf,), False
