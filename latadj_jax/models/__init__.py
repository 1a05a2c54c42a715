"""Model families, and ``from_pretrained``: build a module and load its HF weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from latadj_jax import checkpoints


@dataclasses.dataclass
class Pretrained:
  """A module, its parameters and where they came from."""
  module: Any
  params: dict
  config: Any                 # the family's frozen config dataclass
  hf_config: dict
  model_dir: Path | None
  report: checkpoints.LoadReport | None


def _bert(hf_config: dict, head: str, overrides: dict):
  from latadj_jax.models import bert
  cfg = bert.BertConfig.from_hf(hf_config, **overrides)
  if head == "classification":
    module = bert.BertForSequenceClassification(cfg)
  elif head == "none":
    module = bert.BertModule(cfg)
  else:
    raise ValueError(f"BERT has no {head!r} head; use 'classification' or 'none'")
  return module, cfg, lambda: (jnp.ones((1, 8), jnp.int32),)


# family -> builder(hf_config, head, overrides) -> (module, config, dummy_inputs())
BUILDERS: dict[str, Callable] = {"bert": _bert}


def build(hf_config: dict, head: str = "classification", **overrides: Any):
  """Returns ``(module, config, dummy_inputs)`` for an HF config dict."""
  family = checkpoints.family_of(hf_config)
  return BUILDERS[family](hf_config, head, overrides)


def init_params(module: Any, dummy_inputs: Callable, seed: int = 0) -> dict:
  """Returns freshly initialised parameters (float32)."""
  return jax.jit(module.init)(jax.random.PRNGKey(seed), *dummy_inputs())["params"]


def from_pretrained(name_or_path: str, head: str = "classification", seed: int = 0,
                    **overrides: Any) -> Pretrained:
  """Returns a module with HF weights loaded from a local directory or a hub id.

  Parameters the checkpoint lacks (a new classification head) keep their
  random initialisation from ``seed``; ``overrides`` set config fields such as
  ``num_labels`` or ``dtype``.
  """
  model_dir = checkpoints.resolve_model_dir(name_or_path)
  hf_config = checkpoints.read_config(model_dir)
  module, cfg, dummy = build(hf_config, head, **overrides)
  tensors, fmt = checkpoints.read_weights(model_dir)
  params = init_params(module, dummy, seed)
  params, report = checkpoints.load_weights(params, tensors, fmt, checkpoints.family_of(hf_config))
  return Pretrained(module, params, cfg, hf_config, model_dir, report)
