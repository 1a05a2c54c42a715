"""The one model interface: ``Batch`` in, ``Output`` out, and the registry of families.

Every family (BERT, the decoders, T5) is a ``Family`` registered by its HF
``model_type`` names. ``Family.build`` returns a ``Model``, whose
``apply(params, batch, keep_counts, *, options)`` is the one way code outside
``models/`` runs a network: it never asks which family it holds, only what the
model can do (``kind``: a classifier, a causal LM or a sequence-to-sequence
model).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp



class Batch(NamedTuple):
  """One batch of token ids, BxN; fields a family does not read are left None."""
  input_ids: jax.Array
  attention_mask: jax.Array | None = None      # 1 for real tokens (default: all)
  token_type_ids: jax.Array | None = None      # BERT's segment ids
  position_ids: jax.Array | None = None        # decoders: default 0, 1, ... over valid tokens
  decoder_input_ids: jax.Array | None = None   # T5: teacher-forced decoder inputs, BxT
  decoder_attention_mask: jax.Array | None = None
  inputs_embeds: jax.Array | None = None       # decoders: token embeddings instead of input_ids

  @classmethod
  def of(cls, arrays: Mapping[str, Any]) -> "Batch":
    """Returns the Batch of a data pipeline's dict (other keys, such as labels, stay behind)."""
    return cls(**{f: arrays[f] for f in cls._fields if f in arrays})


@flax.struct.dataclass
class Output:
  """What every family returns; ``K`` is the number of word-vectors that survive every layer."""
  last_hidden_state: jax.Array            # BxKxD, after the final norm where the family has one
  mask: jax.Array                         # BxK: which survivors are real tokens
  positions: jax.Array                    # BxK: each survivor's original position
  layer_positions: tuple                  # per layer, BxN_l original positions after it
  logits: jax.Array | None = None         # classifier BxC; LM BxKxV; T5 BxTxV (decoder inputs)
  pooled: jax.Array | None = None         # BERT's pooler output
  scores: tuple | None = None             # options.scores: per layer, the score vector BxN_{l-1}
  acc: jax.Array | None = None            # options.scores: BxL, ACC of every layer
  kv: tuple | None = None                 # options.kv (decoders): per layer, what it attended over
  hidden_states: tuple | None = None      # options.hidden: the embeddings, then every layer's output


@dataclasses.dataclass(frozen=True)
class Options:
  """Static switches of one forward pass (they change the compiled program)."""
  train: bool = False     # dropout on (needs an rng)
  scores: bool = False    # per-layer score vectors and ACC
  hidden: bool = False    # per-layer hidden states
  kv: bool = False        # decoders: per-layer keys and values, for a KV cache


INFERENCE = Options()


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


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function for an HF ``hidden_act`` name."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def fields_from_hf(cls: type, src: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
  """Returns the entries of an HF config dict that are fields of the dataclass ``cls``.

  HF's ``dtype`` is the checkpoint's storage type, not our activation type, so it never passes.
  """
  names = {f.name for f in dataclasses.fields(cls)} - {"dtype", *skip}
  return {k: v for k, v in src.items() if k in names}


class HFLayerNames:
  """``num_layers`` and ``max_positions`` for configs that keep HF's BERT/Llama field names."""
  num_hidden_layers: int
  max_position_embeddings: int

  @property
  def num_layers(self) -> int:
    return self.num_hidden_layers

  @property
  def max_positions(self) -> int:
    return self.max_position_embeddings


CAUSAL_SURVIVOR_FIELDS = ("survivors", "score_window", "keep_sinks", "keep_recent", "score_pool")


def survivor_fields(run_config: Mapping[str, Any], causal: bool) -> dict[str, Any]:
  """Returns a run config's survivor-rule fields as model-config overrides.

  An encoder takes ``survivors`` only (score, first, random); asking it for
  sinks or a recent window raises, naming the fields.
  """
  if causal:
    return {f: run_config[f] for f in CAUSAL_SURVIVOR_FIELDS if f in run_config}
  extra = [f for f in ("keep_sinks", "keep_recent", "score_pool") if run_config.get(f, 0)]
  if extra:
    raise ValueError(f"--config.{extra[0]} applies to causal LMs (decoders) only; "
                     "an encoder always keeps its readout token and ranks the rest by score")
  return {"survivors": run_config.get("survivors", "score")}


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """A registered architecture: how to build it from an HF config and load its checkpoints.

  ``heads`` maps a head name ("classification", "lm", "seq2seq", "none") to a
  function ``config -> flax module``; ``name_map`` sends a torch tensor name
  to ``(our path or paths, transpose)`` and ``to_torch`` inverts it for export.
  """
  name: str
  kind: str                                   # "classifier", "causal_lm" or "seq2seq"
  config_from_hf: Callable[..., Any]          # (hf dict, **overrides) -> frozen config
  heads: Mapping[str, Callable[[Any], nn.Module]]
  name_map: Callable[[str], Any]
  to_torch: Callable[[Any], dict]
  base_prefix: str                            # the body's scope in a head model's checkpoint
  required_fields: tuple[str, ...] = ()       # config.json fields that fix parameter shapes
  checkpoint_holds_all: bool = False          # no new head: load onto abstract shapes
  hf_classes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # head -> HF class

  @property
  def causal(self) -> bool:
    return self.kind == "causal_lm"

  def build(self, hf_config: Mapping[str, Any], head: str | None = None, *,
            run_config: Mapping[str, Any] | None = None, **overrides: Any) -> "Model":
    """Returns a Model; ``run_config``'s survivor-rule fields become model settings."""
    head = head or next(iter(self.heads))
    if head not in self.heads:
      raise ValueError(f"{self.name} has no {head!r} head; use one of {sorted(self.heads)}")
    if run_config is not None:
      overrides = {**survivor_fields(run_config, self.causal), **overrides}
    config = self.config_from_hf(dict(hf_config), **overrides)
    return Model(self, head, config, self.heads[head](config))


@dataclasses.dataclass(frozen=True)
class Model:
  """A built network behind the one interface; hashable, so jitted functions can key on it."""
  family: Family
  head: str
  config: Any
  module: nn.Module

  @property
  def kind(self) -> str:
    return self.family.kind

  @property
  def num_layers(self) -> int:
    """The number of eliminating layers (T5: the encoder's)."""
    return self.config.num_layers

  @property
  def max_positions(self) -> int | None:
    """The longest input the model takes (None: no limit, as with T5's relative positions)."""
    return self.config.max_positions

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  def replace(self, **fields: Any) -> "Model":
    """Returns the same architecture with config fields changed (dtype, dropout, survivors, ...)."""
    config = dataclasses.replace(self.config, **fields)
    return dataclasses.replace(self, config=config, module=self.family.heads[self.head](config))

  def with_dropout(self, rate: float) -> "Model":
    """Returns the model with every dropout rate set to ``rate``."""
    return self.replace(**{f: rate for f in self.config.DROPOUT_FIELDS})

  def dummy_batch(self) -> Batch:
    ids = jnp.ones((1, 8), jnp.int32)
    return Batch(ids, decoder_input_ids=jnp.zeros((1, 4), jnp.int32) if self.kind == "seq2seq"
                 else None)

  def init(self, seed: int = 0) -> Any:
    """Returns freshly initialised parameters (float32)."""
    return jax.jit(lambda: self.module.init(jax.random.PRNGKey(seed), self.dummy_batch())["params"])()

  def abstract_params(self) -> Any:
    """Returns the parameters' shapes and dtypes, with nothing computed."""
    return jax.eval_shape(self.init)

  def apply(self, params: Any, batch: Batch, keep_counts: Sequence[int] | None = None, *,
            options: Options = INFERENCE, rng: jax.Array | None = None) -> Output:
    """Returns the forward pass at static ``keep_counts`` (None: no elimination).

    Called outside ``jax.jit`` it compiles once per (model, counts, options)
    and shapes, instead of dispatching op by op; inside a jitted function it
    is inlined like any other call.
    """
    counts = None if keep_counts is None else tuple(keep_counts)
    return _jitted_apply(self, counts, options)(params, batch, rng)

  def method(self, name: str, params: Any, *args: Any) -> Any:
    """Returns ``module.<name>(*args)`` with ``params``: prefill, decode, encode, ... of a kind."""
    return self.module.apply({"params": params}, *args, method=name)

  def jit_options(self) -> dict[str, Any]:
    """Returns ``jax.jit`` keyword arguments: the family's XLA:CPU options on CPU."""
    options = getattr(self.config, "cpu_compiler_options", None)
    if options and jax.default_backend() == "cpu":
      return {"compiler_options": dict(options)}
    return {}


@functools.lru_cache(maxsize=256)
def _jitted_apply(model: Model, counts: tuple[int, ...] | None, options: Options):
  def forward(params, batch, rng):
    rngs = {"dropout": rng} if options.train else None
    return model.module.apply({"params": params}, batch, counts, options, rngs=rngs)
  return jax.jit(forward)


def default_position_ids(valid_BxN: jax.Array) -> jax.Array:
  """Returns position ids 0, 1, ... over each row's valid tokens (HF generate's rule).

  For right padding or none this is ``arange``; a left-padded row starts at 0
  at its first valid token.
  """
  return jnp.maximum(jnp.cumsum(valid_BxN.astype(jnp.int32), axis=-1) - 1, 0)


def start_carry(valid_BxN: jax.Array, protect_BxN: jax.Array, **extra: jax.Array) -> dict:
  """Returns the arrays that travel with the word-vectors through Sort+Eliminate."""
  B, N = valid_BxN.shape
  return {"valid": valid_BxN, "protect": protect_BxN,
          "positions": jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)), **extra}


def valid_of(batch: Batch, B: int, N: int) -> jax.Array:
  """Returns the batch's BxN validity mask (all valid when it has none)."""
  if batch.attention_mask is None:
    return jnp.ones((B, N), bool)
  return batch.attention_mask.astype(bool)


_REGISTRY: dict[str, Family] = {}


def register(family: Family, *model_types: str) -> Family:
  """Adds ``family`` under each HF ``model_type`` name; returns it."""
  for name in model_types or (family.name,):
    _REGISTRY[name] = family
  return family


def registered() -> dict[str, Family]:
  return dict(_REGISTRY)
