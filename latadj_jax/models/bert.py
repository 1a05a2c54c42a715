"""Flax (linen) BERT with Sort+Eliminate layers.

Parameter names mirror Hugging Face's Flax BERT (``embeddings``,
``encoder/layer/0/attention/self/query``, ``LayerNorm``, ...), so a
``flax_model.msgpack`` loads as it is. Each encoder layer takes a static keep
count: attention sees all ``N_{l-1}`` word-vectors, then Sort+Eliminate keeps
``N_l`` of them before the output projection, residual, LayerNorm and FFN.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models import attention

MODEL_TYPES = ("bert",)
BASE_PREFIX = "bert"  # the body's scope in BertForSequenceClassification
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyperparameters (the fields of HF's ``BertConfig`` that the model uses)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  num_labels: int = 2
  classifier_dropout: float | None = None
  dtype: str = "float32"          # activations: "float32" or "bfloat16"
  param_dtype: str = "float32"    # parameters as stored: "float32" or "bfloat16"
  selection: str = "gather"       # "gather" or "onehot" token selection
  survivors: str = "score"        # "score" (the method), "first" or "random": the Table VII ablation
  # Inference attention one example at a time (lax.map over the batch): None = on CPU only.
  per_example_attention: bool | None = None
  # > 0: attention one block of this many queries at a time (inference and training), the
  # score vector summed inside the loop, so the BxHxNxN probabilities are never all written.
  attention_block: int = 0

  def __post_init__(self):
    for field in ("dtype", "param_dtype"):
      value = getattr(self, field)
      try:
        ok = jnp.dtype(value).name in DTYPES
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(f"BertConfig.{field} must be one of {DTYPES}, got {value!r}")
    if self.selection not in ("gather", "onehot"):
      raise ValueError(f"BertConfig.selection must be 'gather' or 'onehot', got {self.selection!r}")
    if self.survivors not in elimination.SURVIVOR_RULES:
      raise ValueError(f"BertConfig.survivors must be one of {elimination.SURVIVOR_RULES}, "
                       f"got {self.survivors!r}")

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "BertConfig":
    """Returns a BertConfig from an HF config object or dict, with overrides applied."""
    src = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    fields = {f.name for f in dataclasses.fields(cls)}
    # HF's "dtype" is the checkpoint's storage type, not our activation dtype.
    kwargs = {k: v for k, v in src.items() if k in fields and k != "dtype"}
    if "num_labels" not in src and "id2label" in src:
      kwargs["num_labels"] = len(src["id2label"])
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str):
  """Returns the activation function for an HF ``hidden_act`` name."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _dense(cfg: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                  kernel_init=nn.initializers.normal(cfg.initializer_range))


def _layer_norm(cfg: BertConfig, name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      name=name)


def attention_bias(valid_BxN: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Returns the additive Bx1x1xN key mask: 0 for valid keys, a huge negative for pads."""
  return jnp.where(valid_BxN[:, None, None, :].astype(bool), 0.0,
                   jnp.finfo(dtype).min).astype(dtype)


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, ids_BxN, type_ids_BxN, pos_BxN, deterministic: bool):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=init, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, name=name)
    x_BxNxD = (embed(cfg.vocab_size, "word_embeddings")(ids_BxN)
               + embed(cfg.max_position_embeddings, "position_embeddings")(pos_BxN)
               + embed(cfg.type_vocab_size, "token_type_embeddings")(type_ids_BxN))
    x_BxNxD = _layer_norm(cfg)(x_BxNxD)
    return nn.Dropout(cfg.hidden_dropout_prob)(x_BxNxD, deterministic=deterministic)


def attention_core(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, dtype, with_sv: bool):
  """Returns (ctx_BxNxHxK, float32 probs_BxHxNxN, sv_BxN or None) for one batch of heads.

  Softmax runs in float32: the score vector and ACC are sums of these probabilities.
  """
  # Scaling q (N x K values) rather than the logits (N x N) saves a pass over the largest array.
  logits_BxHxNxN = attention.logits(q_BxNxHxK * q_BxNxHxK.shape[-1] ** -0.5, k_BxNxHxK)
  probs_BxHxNxN = jax.nn.softmax(
      logits_BxHxNxN.astype(jnp.float32) + attention_bias(valid_BxN), axis=-1)
  ctx_BxNxHxK = attention.context(probs_BxHxNxN.astype(dtype), v_BxNxHxK)
  sv_BxN = elimination.score_vector(probs_BxHxNxN, valid_BxN) if with_sv else None
  return ctx_BxNxHxK, probs_BxHxNxN, sv_BxN


def attention_blocked(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, dtype, with_sv: bool,
                      block: int, dropout):
  """Returns (ctx_BxNxHxK, sv_BxN or None): ``attention_core`` over blocks of ``block`` queries.

  ``dropout(probs, start)`` (``attention.block_dropout``; the identity in
  inference) drops each block's probabilities after the score vector has read
  them, as the whole-matrix path does.
  """
  N = q_BxNxHxK.shape[1]
  q_scaled = q_BxNxHxK * q_BxNxHxK.shape[-1] ** -0.5
  bias = attention_bias(valid_BxN)

  def probs_of(start, size):
    rows = jax.lax.dynamic_slice_in_dim(q_scaled, start, size, axis=1)
    return jax.nn.softmax(attention.logits(rows, k_BxNxHxK).astype(jnp.float32) + bias, axis=-1)

  def context_of(probs, start, size):
    return attention.context(dropout(probs, start).astype(dtype), v_BxNxHxK)

  weights = {"score": valid_BxN} if with_sv else None
  ctx, sums = attention.query_blocked(probs_of, context_of, N, block, weights)
  return ctx, (elimination.finish_scores(sums["score"], valid_BxN) if with_sv else None)


def attention_per_example(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, dtype, with_sv: bool):
  """Returns (ctx_BxNxHxK, sv_BxN or None): ``attention_core`` one example at a time.

  The same numbers as the batched form, but each step's HxNxN probabilities
  are small enough to stay in cache, which makes the attention 1.4 to 2.4x
  faster on CPU (``benchmarks/attention_layout.py``). Inference only: the
  probabilities never leave the loop, so there is nothing to apply dropout to.
  """
  def one(args):
    q, k, v, valid = (a[None] for a in args)
    ctx, _, sv = attention_core(q, k, v, valid, dtype, with_sv)
    return ctx[0], (sv[0] if with_sv else jnp.zeros((), jnp.float32))
  ctx_BxNxHxK, sv_BxN = jax.lax.map(one, (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN))
  return ctx_BxNxHxK, (sv_BxN if with_sv else None)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention that also returns the score vector when asked for it."""
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD, valid_BxN, deterministic: bool, with_sv: bool):
    cfg = self.config
    B, N, _ = h_BxNxD.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    split = lambda x: x.reshape(B, N, H, Dh)
    q_BxNxHxK = split(_dense(cfg, cfg.hidden_size, "query")(h_BxNxD))
    k_BxNxHxK = split(_dense(cfg, cfg.hidden_size, "key")(h_BxNxD))
    v_BxNxHxK = split(_dense(cfg, cfg.hidden_size, "value")(h_BxNxD))
    per_example = cfg.per_example_attention
    if per_example is None:
      per_example = jax.default_backend() == "cpu"
    if cfg.attention_block > 0:
      rate = cfg.attention_probs_dropout_prob
      rng = self.make_rng("dropout") if not deterministic and rate > 0 else None
      dropout = attention.block_dropout(rng, rate)
      ctx_BxNxHxK, sv_BxN = attention_blocked(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN,
                                              cfg.dtype, with_sv, cfg.attention_block, dropout)
    elif deterministic and per_example:
      with jax.named_scope("attend"):
        ctx_BxNxHxK, sv_BxN = attention_per_example(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN,
                                                    cfg.dtype, with_sv)
    else:
      _, probs_BxHxNxN, sv_BxN = attention_core(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN,
                                                cfg.dtype, with_sv)
      # The score vector comes from the probabilities before dropout.
      dropped = nn.Dropout(cfg.attention_probs_dropout_prob)(
          probs_BxHxNxN, deterministic=deterministic)
      ctx_BxNxHxK = attention.context(dropped.astype(cfg.dtype), v_BxNxHxK)
    return ctx_BxNxHxK.reshape(B, N, H * Dh), sv_BxN


class BertAddNorm(nn.Module):
  """Dense, dropout, residual add and LayerNorm (HF's ``BertSelfOutput``/``BertOutput``)."""
  config: BertConfig

  @nn.compact
  def __call__(self, x_BxNxF, residual_BxNxD, deterministic: bool):
    cfg = self.config
    y_BxNxD = _dense(cfg, cfg.hidden_size, "dense")(x_BxNxF)
    y_BxNxD = nn.Dropout(cfg.hidden_dropout_prob)(y_BxNxD, deterministic=deterministic)
    return _layer_norm(cfg)(y_BxNxD + residual_BxNxD)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x_BxNxD):
    cfg = self.config
    return activation(cfg.hidden_act)(_dense(cfg, cfg.intermediate_size, "dense")(x_BxNxD))


class BertAttention(nn.Module):
  """Self-attention, then Sort+Eliminate, then the output projection and residual."""
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD, carry: dict, n_keep: int, deterministic: bool,
               with_scores: bool):
    cfg = self.config
    ctx_BxNxD, sv_BxN = BertSelfAttention(cfg, name="self")(
        h_BxNxD, carry["valid"], deterministic, with_scores or n_keep < h_BxNxD.shape[1])
    if n_keep < h_BxNxD.shape[1]:
      names = sorted(carry)
      rng = (self.make_rng("dropout") if cfg.survivors == "random" and not deterministic
             else None)
      rank_BxN = elimination.survivor_ranking(cfg.survivors, sv_BxN, carry["positions"], rng)
      idx_BxK, ctx_BxNxD, h_BxNxD, *kept = elimination.eliminate(
          rank_BxN, carry["valid"], carry["protect"], n_keep, ctx_BxNxD, h_BxNxD,
          *(carry[n] for n in names), method=cfg.selection)
      carry = dict(zip(names, kept))
    out_BxKxD = BertAddNorm(cfg, name="output")(ctx_BxNxD, h_BxNxD, deterministic)
    return out_BxKxD, carry, sv_BxN


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD, carry, n_keep, deterministic, with_scores):
    cfg = self.config
    a_BxKxD, carry, sv_BxN = BertAttention(cfg, name="attention")(
        h_BxNxD, carry, n_keep, deterministic, with_scores)
    f_BxKxF = BertIntermediate(cfg, name="intermediate")(a_BxKxD)
    out_BxKxD = BertAddNorm(cfg, name="output")(f_BxKxF, a_BxKxD, deterministic)
    return out_BxKxD, carry, sv_BxN


def check_keep_counts(keep_counts: Sequence[int] | None, n0: int,
                      num_layers: int) -> tuple[int, ...]:
  """Returns the keep counts as a tuple of ints (all ``n0`` when None), or raises ValueError."""
  if keep_counts is None:
    return (n0,) * num_layers
  counts = tuple(keep_counts)
  if len(counts) != num_layers:
    raise ValueError(f"keep_counts has {len(counts)} entries; the model has {num_layers} layers")
  prev = n0
  for layer, n in enumerate(counts):
    if not isinstance(n, int) or not 1 <= n <= prev:
      raise ValueError(
          f"keep count of layer {layer + 1} must be a Python int in [1, {prev}] "
          f"(the previous layer's count); got {n!r}. Counts: {counts}, input length {n0}")
    prev = n
  return counts


class BertLayerCollection(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD, carry, keep_counts, deterministic, with_scores,
               with_hidden):
    aux = {"hidden_states": [h_BxNxD] if with_hidden else None,
           "scores": [], "acc": [], "positions": []}
    for i in range(self.config.num_hidden_layers):
      valid_before = carry["valid"]
      h_BxNxD, carry, sv_BxN = BertLayer(self.config, name=str(i))(
          h_BxNxD, carry, keep_counts[i], deterministic, with_scores)
      aux["positions"].append(carry["positions"])
      if with_hidden:
        aux["hidden_states"].append(h_BxNxD)
      if with_scores:
        aux["scores"].append(sv_BxN)
        aux["acc"].append(elimination.acc(sv_BxN, valid_before))
    return h_BxNxD, carry, aux


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD, carry, keep_counts, deterministic, with_scores,
               with_hidden):
    return BertLayerCollection(self.config, name="layer")(
        h_BxNxD, carry, keep_counts, deterministic, with_scores, with_hidden)


class BertPooler(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(h_BxNxD[:, 0]))


class BertModule(nn.Module):
  """BERT body: embeddings, encoder with Sort+Eliminate, pooler (HF ``FlaxBertModule`` names)."""
  config: BertConfig
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               keep_counts: Sequence[int] | None = None, deterministic: bool = True,
               output_hidden_states: bool = False, output_scores: bool = False):
    """Returns a dict: last_hidden_state [B, N_L, D], pooler_output, mask, positions, ...

    ``keep_counts`` must be static (Python ints); ``mask`` and ``positions``
    give the validity and original position of every surviving word-vector.
    """
    cfg = self.config
    B, N = input_ids.shape
    counts = check_keep_counts(keep_counts, N, cfg.num_hidden_layers)
    if attention_mask is None:
      attention_mask = jnp.ones((B, N), jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((B, N), jnp.int32)
    positions_BxN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
    valid_BxN = attention_mask.astype(bool)
    h_BxNxD = BertEmbeddings(cfg, name="embeddings")(
        input_ids, token_type_ids, positions_BxN, deterministic)
    carry = {"valid": valid_BxN, "positions": positions_BxN,
             "protect": elimination.first_token_mask(valid_BxN)}
    h_BxKxD, carry, aux = BertEncoder(cfg, name="encoder")(
        h_BxNxD, carry, counts, deterministic, output_scores, output_hidden_states)
    out = {"last_hidden_state": h_BxKxD, "mask": carry["valid"],
           "positions": carry["positions"], "layer_positions": aux["positions"]}
    if self.add_pooling_layer:
      out["pooler_output"] = BertPooler(cfg, name="pooler")(h_BxKxD)
    if output_hidden_states:
      out["hidden_states"] = aux["hidden_states"]
    if output_scores:
      out["scores"], out["acc"] = aux["scores"], jnp.stack(aux["acc"], axis=-1)
    return out


class BertForSequenceClassification(nn.Module):
  """BERT with a classification (or, for ``num_labels == 1``, regression) head on the pooler."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               keep_counts: Sequence[int] | None = None, deterministic: bool = True,
               output_hidden_states: bool = False, output_scores: bool = False):
    """Returns the body's dict plus ``logits`` [B, num_labels]."""
    cfg = self.config
    out = BertModule(cfg, name="bert")(
        input_ids, attention_mask, token_type_ids, keep_counts, deterministic,
        output_hidden_states, output_scores)
    rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
    pooled = nn.Dropout(rate)(out["pooler_output"], deterministic=deterministic)
    out["logits"] = _dense(cfg, cfg.num_labels, "classifier")(pooled).astype(jnp.float32)
    return out


def build(hf_config: dict, head: str = "classification", **overrides: Any):
  """Returns ``(module, config, dummy_inputs)`` for an HF BERT config dict."""
  cfg = BertConfig.from_hf(hf_config, **overrides)
  heads = {"classification": BertForSequenceClassification, "none": BertModule}
  if head not in heads:
    raise ValueError(f"BERT has no {head!r} head; use one of {sorted(heads)}")
  return heads[head](cfg), cfg, lambda: (jnp.ones((1, 8), jnp.int32),)


def torch_name_map(name: str) -> tuple[tuple[str, ...], bool] | None:
  """Returns the Flax path of a torch BERT tensor and whether to transpose it (None: skip)."""
  parts = name.split(".")
  if parts[-1] == "position_ids" or parts[0] == "cls":
    return None  # a buffer, and the pre-training heads we don't build
  module, leaf = tuple(parts[:-1]), parts[-1]
  if module[-1] == "LayerNorm":
    return module + ({"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf),), False
  if module[-1].endswith("embeddings"):
    return module + ("embedding",), False
  if leaf == "weight":
    return module + ("kernel",), True  # torch Linear stores [out, in]
  return module + (leaf,), False
