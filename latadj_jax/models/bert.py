"""Flax (linen) BERT: the encoder classifier family, run by the one eliminating stack.

Parameter names mirror Hugging Face's Flax BERT (``embeddings``,
``encoder/layer/0/attention/self/query``, ``LayerNorm``, ...), so a
``flax_model.msgpack`` loads as it is. Each layer attends over all ``N_{l-1}``
word-vectors (``attend``); ``stack.run`` keeps ``N_l`` of them, [CLS] always
among them, before the output projection, residual, LayerNorm and FFN (``finish``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.core import elimination
from latadj_jax.models import attention, checkpoints, interface, stack
from latadj_jax.models.interface import Batch, Options, Output

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BertConfig(interface.HFLayerNames):
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

  DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides: Any) -> "BertConfig":
    """Returns a BertConfig from an HF config object or dict, with overrides applied."""
    src = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    kwargs = interface.fields_from_hf(cls, src)
    if "num_labels" not in src and "id2label" in src:
      kwargs["num_labels"] = len(src["id2label"])
    return cls(**{**kwargs, **overrides})

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads



def _dense(cfg: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                  kernel_init=nn.initializers.normal(cfg.initializer_range))


def _layer_norm(cfg: BertConfig, name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      name=name)


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


class BertSelfAttention(nn.Module):
  """Multi-head self-attention that also returns the column sums the stack asks for."""
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD, valid_BxN, queries: dict, deterministic: bool):
    cfg = self.config
    B, N, _ = h_BxNxD.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    split = lambda x: x.reshape(B, N, H, Dh)
    q_BxNxHxK = split(_dense(cfg, cfg.hidden_size, "query")(h_BxNxD))
    k_BxNxHxK = split(_dense(cfg, cfg.hidden_size, "key")(h_BxNxD))
    v_BxNxHxK = split(_dense(cfg, cfg.hidden_size, "value")(h_BxNxD))
    qkv = (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, valid_BxN, cfg.dtype, queries)
    per_example = cfg.per_example_attention
    if per_example is None:
      per_example = jax.default_backend() == "cpu"
    if cfg.attention_block > 0:
      rate = cfg.attention_probs_dropout_prob
      rng = self.make_rng("dropout") if not deterministic and rate > 0 else None
      ctx_BxNxHxK, sums = attention.bidirectional_blocked(*qkv, cfg.attention_block,
                                            attention.block_dropout(rng, rate))
    elif deterministic and per_example:
      with jax.named_scope("attend"):
        ctx_BxNxHxK, sums = attention.bidirectional_per_example(*qkv)
    else:
      _, probs_BxHxNxN, sums = attention.bidirectional(*qkv)
      # The column sums come from the probabilities before dropout.
      dropped = nn.Dropout(cfg.attention_probs_dropout_prob)(
          probs_BxHxNxN, deterministic=deterministic)
      ctx_BxNxHxK = attention.context(dropped.astype(cfg.dtype), v_BxNxHxK)
    return ctx_BxNxHxK.reshape(B, N, H * Dh), sums


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
    return interface.activation(cfg.hidden_act)(_dense(cfg, cfg.intermediate_size, "dense")(x_BxNxD))


class BertAttention(nn.Module):
  """HF's ``attention`` scope: ``self`` (q/k/v) and ``output`` (projection, residual, LayerNorm)."""
  config: BertConfig

  def setup(self):
    self.self = BertSelfAttention(self.config)
    self.output = BertAddNorm(self.config)


class BertLayer(nn.Module):
  """One encoder layer, split at the Eliminate point for ``stack.run``."""
  config: BertConfig
  index: int = 0

  def setup(self):
    self.attention = BertAttention(self.config)
    self.intermediate = BertIntermediate(self.config)
    self.output = BertAddNorm(self.config)

  def attend(self, h_BxNxD, carry: dict, queries: dict, deterministic: bool):
    ctx_BxNxD, sums = self.attention.self(h_BxNxD, carry["valid"], queries, deterministic)
    return ctx_BxNxD, sums, None

  def finish(self, h_BxKxD, ctx_BxKxD, deterministic: bool):
    a_BxKxD = self.attention.output(ctx_BxKxD, h_BxKxD, deterministic)
    return self.output(self.intermediate(a_BxKxD), a_BxKxD, deterministic)

  def __call__(self, h_BxNxD, carry: dict, deterministic: bool = True):
    """Returns the layer's output with nothing eliminated."""
    ctx_BxNxD, _, _ = self.attend(h_BxNxD, carry, {}, deterministic)
    return self.finish(h_BxNxD, ctx_BxNxD, deterministic)


class BertEncoder(nn.Module):
  config: BertConfig

  def setup(self):
    self.layer = stack.Layers(BertLayer, self.config, self.config.num_hidden_layers)


class BertPooler(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(h_BxNxD[:, 0]))


class BertModule(nn.Module):
  """BERT body: embeddings, encoder with Sort+Eliminate, pooler (HF ``FlaxBertModule`` names)."""
  config: BertConfig
  add_pooling_layer: bool = True

  def setup(self):
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = BertEncoder(self.config)
    if self.add_pooling_layer:
      self.pooler = BertPooler(self.config)

  def __call__(self, batch: Batch, keep_counts: Sequence[int] | None = None,
               options: Options = interface.INFERENCE) -> Output:
    """Returns the survivors' states; ``keep_counts`` must be static (Python ints)."""
    cfg = self.config
    B, N = batch.input_ids.shape
    counts = interface.check_keep_counts(keep_counts, N, cfg.num_hidden_layers)
    types_BxN = (jnp.zeros((B, N), jnp.int32) if batch.token_type_ids is None
                 else batch.token_type_ids)
    valid_BxN = interface.valid_of(batch, B, N)
    carry = interface.start_carry(valid_BxN, elimination.first_token_mask(valid_BxN))
    h_BxNxD = self.embeddings(batch.input_ids, types_BxN, carry["positions"], not options.train)
    survivors = stack.Survivors.of(cfg, causal=False)
    rng = self.make_rng("dropout") if options.train and cfg.survivors == "random" else None
    h_BxKxD, carry, aux = stack.run(self.encoder.layer.layers, h_BxNxD, carry, counts, survivors,
                                    options, rng)
    return Output(
        last_hidden_state=h_BxKxD, mask=carry["valid"], positions=carry["positions"],
        layer_positions=tuple(aux["positions"]),
        pooled=self.pooler(h_BxKxD) if self.add_pooling_layer else None,
        scores=tuple(aux["scores"]) if options.scores else None,
        acc=jnp.stack(aux["acc"], axis=-1) if options.scores else None,
        hidden_states=tuple(aux["hidden"]) if options.hidden else None)


class BertForSequenceClassification(nn.Module):
  """BERT with a classification (or, for ``num_labels == 1``, regression) head on the pooler."""
  config: BertConfig

  @nn.compact
  def __call__(self, batch: Batch, keep_counts: Sequence[int] | None = None,
               options: Options = interface.INFERENCE) -> Output:
    """Returns the body's output with ``logits`` [B, num_labels]."""
    cfg = self.config
    out = BertModule(cfg, name="bert")(batch, keep_counts, options)
    rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
    pooled = nn.Dropout(rate)(out.pooled, deterministic=not options.train)
    return out.replace(logits=_dense(cfg, cfg.num_labels, "classifier")(pooled).astype(jnp.float32))


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


FAMILY = interface.register(interface.Family(
    name="bert", kind="classifier", config_from_hf=BertConfig.from_hf,
    heads={"classification": BertForSequenceClassification, "none": BertModule},
    name_map=torch_name_map,
    to_torch=lambda params: checkpoints.invert_name_map(params, torch_name_map),
    base_prefix="bert", hf_classes={"classification": "BertForSequenceClassification"},
    required_fields=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings")), "bert")
