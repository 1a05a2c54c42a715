"""Flax (linen) Llama causal LM, with Mistral and Qwen2, and causal Sort+Eliminate layers.

Parameter names mirror HF's ``LlamaForCausalLM`` (and its Flax port):
``model/embed_tokens/embedding``, ``model/layers/0/self_attn/q_proj/kernel``,
``.../mlp/gate_proj``, ``input_layernorm/weight``, ``model/norm/weight``,
``lm_head/kernel`` (absent when the head is tied to the embedding).

The blocks are GPT-2's with three changes: RMSNorm, SwiGLU, and rotary
position embeddings (RoPE) applied to q and k inside every layer. Elimination
is placed as in GPT-2 (METHOD.md section 4): a layer attends over all
``N_{l-1}`` word-vectors, then Sort+Eliminate keeps ``N_l`` of them before
``o_proj``. Each survivor carries its *original* RoPE position id, so a later
layer rotates it by where the token was in the prompt, not by its new slot;
the causal mask also compares the carried original positions. Grouped-query
attention (fewer k/v heads than q heads) is computed per k/v head group,
without copying k and v. Keys go into the KV cache already rotated, as in HF.
The RoPE and grouped-query math is in ``llama_attention``; the LM head, its
prefill and decode are ``lm_head.CausalLM``'s, shared with GPT-2.

Mistral adds a sliding window to the mask (on original positions); its scores
still use eq. 8's count of all later queries, not only those inside the
window. Qwen2 adds q/k/v biases. No dropout: this family is used training-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models import attention
from latadj_jax.models.bert import check_keep_counts
from latadj_jax.models.gpt2 import causal_allowed, default_position_ids
from latadj_jax.models.lm_head import CausalLM
# Part of this module's surface (the tasks call ``llama.jit_options`` for any causal LM).
from latadj_jax.models.lm_head import jit_options as jit_options
from latadj_jax.models.llama_attention import (apply_rope, gqa_context, gqa_probs, rope_cos_sin,
                                               rope_inv_freq)

MODEL_TYPES = ("llama", "mistral", "qwen2")
BASE_PREFIX = "model"  # the body's scope in LlamaForCausalLM
CHECKPOINT_HOLDS_ALL = True  # every parameter comes from the checkpoint: load onto abstract shapes
ROPE_TYPES = ("default", "linear", "llama3")
# XLA:CPU (jaxlib 0.10) hands float32 dots to YNNPACK, whose sums carry ~13x the rounding error
# of Eigen's on SmolLM2's layer 11: there the MLP writes a 22,500-sized activation from 1,536
# products as large as 16,600, and the error (1.1e-2 against float64; Eigen 8.3e-4, torch
# 1.1e-3) reaches the logits as 1.3e-4 against HF's. Compiled with Eigen's dot they are 6.6e-5
# from HF's, as close as HF's own float32 is to its float64 (4e-5). The cost: a 512-token
# SmolLM2 prefill takes 1.57 s against YNNPACK's 1.47 s (7% slower; 2-core CPU, medians of 9).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama-family hyperparameters (the fields of HF's ``LlamaConfig`` that the model uses)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None   # None: as many as query heads (no GQA)
  head_dim_: int | None = None             # HF's ``head_dim``; None: hidden_size // heads
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"               # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0        # llama3 only
  rope_high_freq_factor: float = 4.0       # llama3 only
  rope_original_max_positions: int = 8192  # llama3 only
  attention_bias: bool = False             # Llama: biases on q, k, v and o
  qkv_bias: bool = False                   # Qwen2: biases on q, k, v only
  mlp_bias: bool = False
  sliding_window: int | None = None        # Mistral
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  model_type: str = "llama"
  dtype: str = "float32"                   # activations; parameters stay float32
  selection: str = "gather"                # "gather" or "onehot" token selection
  survivors: str = "score"                 # elimination.CAUSAL_RULES: score (eq. 8), window, ...
  score_window: int = 32                   # "window": score by the last this many queries
  keep_sinks: int = 0                      # the first this many tokens always survive
  keep_recent: int = 0                     # the last this many tokens always survive
  score_pool: int = 0                      # score/window: max-pool the scores over K neighbours
  attention_block: int = 0                 # attend this many queries at a time (0: all at once)

  def __post_init__(self):
    elimination.check_causal_rule(self.survivors, self.score_window, self.keep_sinks,
                                  self.keep_recent, self.score_pool)
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"RoPE type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                       f"{self.kv_heads} key/value heads")

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "LlamaConfig":
    """Returns a LlamaConfig from an HF config object or dict, with overrides applied."""
    src = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = src.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not a Llama-family model {MODEL_TYPES}")
    if src.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {src['hidden_act']!r} is not supported; Llama uses silu")
    if model_type == "qwen2" and src.get("use_sliding_window"):
      raise ValueError("Qwen2 with use_sliding_window=True (per-layer windows) is not supported")
    # Transformers 5 keeps theta and scaling in ``rope_parameters``; 4.x in rope_theta/rope_scaling.
    rope = dict(src.get("rope_parameters") or src.get("rope_scaling") or {})
    kwargs = {
        "rope_theta": float(rope.get("rope_theta", src.get("rope_theta", 10000.0))),
        "rope_type": rope.get("rope_type", rope.get("type", "default")),
        "head_dim_": src.get("head_dim"),
        "qkv_bias": model_type == "qwen2",
        "sliding_window": src.get("sliding_window") if model_type == "mistral" else None,
    }
    for ours, theirs in (("rope_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                         ("rope_high_freq_factor", "high_freq_factor"),
                         ("rope_original_max_positions", "original_max_position_embeddings")):
      if rope.get(theirs) is not None:
        kwargs[ours] = rope[theirs]
    # HF's "dtype" is the checkpoint's storage type, not our activation type.
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "head_dim_"} - set(kwargs)
    kwargs.update({k: v for k, v in src.items() if k in fields})
    kwargs["model_type"] = model_type
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def head_dim(self) -> int:
    return self.head_dim_ or self.hidden_size // self.num_attention_heads

  # GPT-2's names, so the LM evaluation and generation code reads either family.
  @property
  def n_layer(self) -> int:
    return self.num_hidden_layers

  @property
  def n_positions(self) -> int:
    return self.max_position_embeddings


def allowed_keys(pos_q_BxQ: jax.Array, pos_k_BxS: jax.Array, valid_k_BxS: jax.Array,
                 sliding_window: int | None) -> jax.Array:
  """Returns the BxQxS mask: causal (and windowed) on original positions, pads excluded."""
  allowed = causal_allowed(pos_q_BxQ, pos_k_BxS, valid_k_BxS)
  if sliding_window:
    allowed &= (pos_q_BxQ[:, :, None] - pos_k_BxS[:, None, :]) < sliding_window
  return allowed


# --- modules ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
  """HF's LlamaRMSNorm: normalise in float32, then scale by ``weight``."""
  eps: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxNxD):
    weight_D = self.param("weight", nn.initializers.ones, (x_BxNxD.shape[-1],))
    x32 = x_BxNxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return weight_D.astype(self.dtype) * normed.astype(self.dtype)


def _dense(cfg: LlamaConfig, features: int, bias: bool, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=cfg.dtype, name=name,
                  kernel_init=nn.initializers.normal(cfg.initializer_range))


class LlamaAttention(nn.Module):
  """Holds q/k/v/o projections; the layer calls its steps so it can eliminate in between."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    self.q_proj = _dense(cfg, cfg.num_attention_heads * cfg.head_dim, qkv_bias)
    self.k_proj = _dense(cfg, cfg.kv_heads * cfg.head_dim, qkv_bias)
    self.v_proj = _dense(cfg, cfg.kv_heads * cfg.head_dim, qkv_bias)
    self.o_proj = _dense(cfg, cfg.hidden_size, cfg.attention_bias)

  def qkv(self, a_BxNxD, rope_pos_BxN):
    """Returns q BxNxHxK and k, v BxNxGxK, with q and k rotated by their RoPE position ids."""
    cfg = self.config
    B, N, _ = a_BxNxD.shape
    q = self.q_proj(a_BxNxD).reshape(B, N, cfg.num_attention_heads, cfg.head_dim)
    k = self.k_proj(a_BxNxD).reshape(B, N, cfg.kv_heads, cfg.head_dim)
    v = self.v_proj(a_BxNxD).reshape(B, N, cfg.kv_heads, cfg.head_dim)
    cos, sin = rope_cos_sin(rope_pos_BxN, rope_inv_freq(cfg))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def attend(self, q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, pos_q_BxQ, pos_k_BxS, valid_k_BxS,
             weights=None, block: int = 0):
    """Returns (ctx_BxQxD with heads concatenated, {name: column sums BxS} for ``weights``).

    ``attention.query_blocked`` runs it ``block`` queries at a time (0: all at once).
    """
    window = self.config.sliding_window

    def probs_of(start, size):
      rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
      allowed = allowed_keys(rows(pos_q_BxQ), pos_k_BxS, valid_k_BxS, window)
      return gqa_probs(rows(q_BxQxHxK), k_BxSxGxK, allowed)

    context_of = lambda probs, start, size: gqa_context(probs.astype(self.config.dtype), v_BxSxGxK)
    Q = q_BxQxHxK.shape[1]
    return attention.query_blocked(probs_of, context_of, Q, block, weights)


class LlamaMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxNxD):
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x_BxNxD)
    up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x_BxNxD)
    return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm layer: attention over N_{l-1}, Sort+Eliminate, then o_proj and the MLP on N_l."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.input_layernorm = RMSNorm(cfg.rms_norm_eps, cfg.dtype)
    self.self_attn = LlamaAttention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, cfg.dtype)
    self.mlp = LlamaMLP(cfg)

  def _finish(self, h_BxKxD, ctx_BxKxD):
    h_BxKxD = h_BxKxD + self.self_attn.o_proj(ctx_BxKxD)
    return h_BxKxD + self.mlp(self.post_attention_layernorm(h_BxKxD))

  def __call__(self, h_BxNxD, carry: dict, n_keep: int, with_scores: bool):
    """Returns (h_BxKxD, carry at the kept positions, SV_BxN or None, kv of the N attended)."""
    cfg = self.config
    q, k, v = self.self_attn.qkv(self.input_layernorm(h_BxNxD), carry["rope_pos"])
    valid, pos = carry["valid"], carry["positions"]
    weights = elimination.score_queries(cfg.survivors, valid, cfg.score_window, with_scores,
                                        n_keep < valid.shape[1])
    ctx_BxNxD, sums = self.self_attn.attend(q, k, v, pos, pos, valid, weights, cfg.attention_block)
    kv = {"k": k, "v": v, "valid": valid, "positions": pos}
    sv_BxN, carry, ctx_BxNxD, h_BxNxD = elimination.causal_step(
        sums, carry, n_keep, ctx_BxNxD, h_BxNxD, rule=cfg.survivors,
        window=cfg.score_window, with_scores=with_scores, method=cfg.selection,
        pool=cfg.score_pool)
    return self._finish(h_BxNxD, ctx_BxNxD), carry, sv_BxN, kv

  def decode(self, h_Bx1xD, cache: dict, slot, pos_B, rope_pos_B):
    """Returns (h_Bx1xD, cache with this token's rotated k and its v written at ``slot``)."""
    q, k, v = self.self_attn.qkv(self.input_layernorm(h_Bx1xD), rope_pos_B[:, None])
    upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), slot, 1)
    cache = {"k": upd(cache["k"], k), "v": upd(cache["v"], v),
             "valid": upd(cache["valid"], jnp.ones_like(pos_B, bool)[:, None]),
             "positions": upd(cache["positions"], pos_B[:, None])}
    ctx_Bx1xD, _ = self.self_attn.attend(q, cache["k"], cache["v"], pos_B[:, None],
                                         cache["positions"], cache["valid"])
    return self._finish(h_Bx1xD, ctx_Bx1xD), cache


class LlamaLayerCollection(nn.Module):
  config: LlamaConfig

  def setup(self):
    self.blocks = [LlamaDecoderLayer(self.config, name=str(i))
                   for i in range(self.config.num_hidden_layers)]

  def __call__(self, h_BxNxD, carry, keep_counts, with_scores, with_hidden):
    """Returns (h_BxKxD, carry, aux) with per-layer positions, kv, scores, ACC, hidden states."""
    aux = {"hidden_states": [h_BxNxD], "scores": [], "acc": [], "positions": [], "kv": []}
    for block, n_keep in zip(self.blocks, keep_counts):
      valid_before = carry["valid"]
      h_BxNxD, carry, sv_BxN, kv = block(h_BxNxD, carry, n_keep, with_scores)
      aux["positions"].append(carry["positions"])
      aux["kv"].append(kv)
      if with_hidden:
        aux["hidden_states"].append(h_BxNxD)
      if with_scores:
        aux["scores"].append(sv_BxN)
        aux["acc"].append(elimination.acc(sv_BxN, valid_before))
    return h_BxNxD, carry, aux

  def decode(self, h_Bx1xD, caches, slot_offsets, pos_B, rope_pos_B):
    """Returns (h_Bx1xD, caches); layer l writes at ``slot_offsets[l]``."""
    new = []
    for block, cache, slot in zip(self.blocks, caches, slot_offsets):
      h_Bx1xD, cache = block.decode(h_Bx1xD, cache, slot, pos_B, rope_pos_B)
      new.append(cache)
    return h_Bx1xD, new


class LlamaModel(nn.Module):
  """Llama body: token embedding, layers with Sort+Eliminate, final ``norm`` (HF names)."""
  config: LlamaConfig
  CPU_COMPILER_OPTIONS = CPU_COMPILER_OPTIONS  # for ``jit_options``; not a dataclass field

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                 embedding_init=nn.initializers.normal(cfg.initializer_range))
    self.layers = LlamaLayerCollection(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype)

  def __call__(self, input_ids, attention_mask=None, keep_counts: Sequence[int] | None = None,
               deterministic: bool = True, output_scores: bool = False,
               output_hidden_states: bool = False, inputs_embeds=None, position_ids=None,
               output_kv: bool = False):
    """Returns a dict: last_hidden_state [B, N_L, D], mask, positions, layer_positions, ...

    ``keep_counts`` must be static (Python ints). ``positions`` holds each
    survivor's original position; ``position_ids`` (default: 0, 1, ... over
    each row's valid tokens, HF's rule) are the RoPE positions, carried with
    the survivors. ``deterministic`` is accepted for GPT-2's signature; there
    is no dropout.
    """
    del deterministic
    cfg = self.config
    x_BxNxD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
    B, N = x_BxNxD.shape[:2]
    counts = check_keep_counts(keep_counts, N, cfg.num_hidden_layers)
    valid_BxN = (jnp.ones((B, N), bool) if attention_mask is None
                 else attention_mask.astype(bool))
    if position_ids is None:
      position_ids = default_position_ids(valid_BxN)
    carry = {"valid": valid_BxN,
             "positions": jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)),
             "rope_pos": jnp.asarray(position_ids, jnp.int32),
             "protect": elimination.causal_protect(valid_BxN, cfg.keep_sinks, cfg.keep_recent)}
    h_BxKxD, carry, aux = self.layers(x_BxNxD, carry, counts, output_scores, output_hidden_states)
    h_BxKxD = self.norm(h_BxKxD)
    out = {"last_hidden_state": h_BxKxD, "mask": carry["valid"],
           "positions": carry["positions"], "layer_positions": aux["positions"]}
    if output_hidden_states:
      out["hidden_states"] = aux["hidden_states"][:-1] + [h_BxKxD]  # as in HF: last is after norm
    if output_scores:
      out["scores"], out["acc"] = aux["scores"], jnp.stack(aux["acc"], axis=-1)
    if output_kv:
      out["kv"] = aux["kv"]
    return out

  def decode(self, token_B, caches, slot_offsets, pos_B, pos_id_B):
    """Returns (h_BxD after norm, caches) for one new token per row."""
    h_Bx1xD, caches = self.layers.decode(self.embed_tokens(token_B[:, None]), caches,
                                         slot_offsets, pos_B, pos_id_B)
    return self.norm(h_Bx1xD)[:, 0], caches


class LlamaForCausalLM(CausalLM):
  """Llama with the LM head, tied to ``embed_tokens`` when ``tie_word_embeddings``."""
  config: LlamaConfig
  BODY = LlamaModel
  BODY_SCOPE = BASE_PREFIX
  EMBEDDING = "embed_tokens"
  CPU_COMPILER_OPTIONS = CPU_COMPILER_OPTIONS  # for ``jit_options``; not a dataclass field


def build(hf_config: dict, head: str = "lm", **overrides: Any):
  """Returns ``(module, config, dummy_inputs)`` for an HF Llama/Mistral/Qwen2 config dict."""
  cfg = LlamaConfig.from_hf(hf_config, **overrides)
  heads = {"lm": LlamaForCausalLM, "none": LlamaModel}
  if head not in heads:
    raise ValueError(f"{cfg.model_type} has no {head!r} head; use one of {sorted(heads)}")
  return heads[head](cfg), cfg, lambda: (jnp.ones((1, 8), jnp.int32),)


def torch_name_map(name: str) -> tuple[tuple[str, ...], bool] | None:
  """Returns the Flax path of a torch Llama tensor and whether to transpose it (None: skip).

  Torch ``Linear`` stores [out, in]; ``nn.Dense`` stores [in, out].
  """
  parts = name.split(".")
  module, leaf = tuple(parts[:-1]), parts[-1]
  if module[-1:] == ("rotary_emb",):
    return None  # inv_freq buffers, recomputed from the config
  if module[-1] == "embed_tokens":
    return module + ("embedding",), False
  if module[-1].endswith("norm"):
    return module + (leaf,), False
  return module + ({"weight": "kernel"}.get(leaf, leaf),), leaf == "weight"
