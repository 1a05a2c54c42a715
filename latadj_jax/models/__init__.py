"""The model families behind one interface, and ``from_pretrained``: build a model, load HF weights.

``get(model_type)`` returns a registered ``Family`` (BERT; the decoders GPT-2,
Llama, Mistral, Qwen2; T5); ``build`` and ``from_pretrained`` return a
``Model`` whose ``apply(params, batch, keep_counts, *, options)`` every caller
uses. Nothing outside this package asks which family it holds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax

from latadj_jax.models import bert, checkpoints, decoder_variants, t5  # noqa: F401 (they register)
from latadj_jax.models.interface import (INFERENCE, Batch, Family, Model, Options, Output,
                                         registered)

__all__ = ["Batch", "Family", "INFERENCE", "KindError", "Model", "Options", "Output", "Pretrained",
           "build", "from_pretrained", "get"]


class KindError(ValueError):
  """A checkpoint holds another kind of model than the run needs (a classifier for an LM run, ...)."""


def get(model_type: str) -> Family:
  """Returns the family registered for an HF ``model_type``, or raises CheckpointError."""
  families = registered()
  if model_type not in families:
    raise checkpoints.CheckpointError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(families))}")
  return families[model_type]


def build(hf_config: Mapping[str, Any], head: str | None = None, *,
          run_config: Mapping[str, Any] | None = None, **overrides: Any) -> Model:
  """Returns the Model of an HF config dict; ``head=None`` takes the family's default head.

  ``run_config``'s survivor-rule fields (``survivors``, ``keep_sinks``, ...) become
  model settings; ``overrides`` set config fields such as ``num_labels`` or ``dtype``.
  """
  return get(hf_config.get("model_type", "")).build(hf_config, head, run_config=run_config,
                                                     **overrides)


@dataclasses.dataclass
class Pretrained:
  """A model, its parameters and where they came from."""
  model: Model
  params: Any
  hf_config: dict
  model_dir: Path | None = None
  report: checkpoints.LoadReport | None = None
  gguf_file: Path | None = None  # set when the weights came from a .gguf file


def required_fields() -> dict[str, tuple[str, ...]]:
  """Returns, per known model_type, the config.json fields that fix its parameter shapes."""
  return {name: f.required_fields for name, f in registered().items()}


def from_pretrained(name_or_path: str, head: str | None = None, seed: int = 0,
                    sharding: jax.sharding.Sharding | None = None, *, kind: str | None = None,
                    run_config: Mapping[str, Any] | None = None, **overrides: Any) -> Pretrained:
  """Returns a model with HF weights loaded from a local directory or a hub id.

  ``head=None`` takes the family's default (BERT: classification, decoders:
  lm, T5: seq2seq). Parameters the checkpoint lacks (a new classification
  head) keep their random initialisation from ``seed``; ``run_config`` and
  ``overrides`` are as in ``build``. A ``.gguf`` file, or a directory holding
  one (and no HF weights), is read by ``gguf_loader``. With ``kind`` ("classifier",
  "causal_lm", "seq2seq") a checkpoint of another kind raises KindError before
  its weights are read.

  The parameters are device arrays, placed with ``sharding`` (default: the
  default device), so a jitted call never copies the weights from the host.
  """
  from latadj_jax.models import gguf_loader
  gguf_file = gguf_loader.find_gguf(name_or_path)
  if gguf_file is not None:
    hf_config, tensors = gguf_loader.read_gguf(gguf_file)
    fmt, model_dir = "torch", gguf_file.parent
  else:
    model_dir = checkpoints.resolve_model_dir(name_or_path)
    hf_config = checkpoints.read_config(model_dir, required_fields())
  found = get(hf_config.get("model_type", "")).kind
  if kind is not None and found != kind:
    raise KindError(f"{name_or_path!r} holds a {hf_config.get('model_type')!r} model, a {found}, "
                    f"not a {kind}")
  if gguf_file is None:
    tensors, fmt = checkpoints.read_weights(model_dir)
  model = build(hf_config, head, run_config=run_config, **overrides)
  family = model.family
  if family.checkpoint_holds_all or gguf_file is not None:
    # Onto abstract shapes: no init to compile (slow for a 30-layer model on a CPU).
    params, report = load_tensors(model.abstract_params(), family, tensors, fmt)
    if report.missing:
      raise checkpoints.CheckpointError(
          f"{gguf_file or model_dir} lacks parameters {report.missing[:5]} "
          f"({len(report.missing)} in all)")
  else:
    params, report = load_tensors(model.init(seed), family, tensors, fmt)
  return Pretrained(model, jax.device_put(params, sharding), hf_config, model_dir, report, gguf_file)


def load_tensors(params: Any, family: Family, tensors: Mapping, fmt: str):
  """Returns ``(params, report)`` with the checkpoint tensors loaded by the family's name map."""
  return checkpoints.load_weights(params, tensors, fmt, family.name_map, family.base_prefix)
