"""Model families, and ``from_pretrained``: build a module and load its HF weights.

Each family module (``bert``, ``gpt2``, ``t5``, ``llama``) exposes the same small surface:
``MODEL_TYPES``, ``BASE_PREFIX``, ``build(hf_config, head, **overrides)`` and
``torch_name_map(name)``. This file only dispatches on ``model_type``.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import jax

from latadj_jax.models import checkpoints

FAMILY_MODULES = {"bert": "latadj_jax.models.bert", "gpt2": "latadj_jax.models.gpt2",
                  "t5": "latadj_jax.models.t5", "llama": "latadj_jax.models.llama",
                  "mistral": "latadj_jax.models.llama", "qwen2": "latadj_jax.models.llama"}


@dataclasses.dataclass
class Pretrained:
  """A module, its parameters and where they came from."""
  module: Any
  params: dict
  config: Any                 # the family's frozen config dataclass
  hf_config: dict
  model_dir: Path | None
  report: checkpoints.LoadReport | None
  gguf_file: Path | None = None  # set when the weights came from a .gguf file


def family(hf_config: dict) -> ModuleType:
  """Returns the family module for an HF config, or raises CheckpointError if unsupported."""
  model_type = hf_config.get("model_type", "")
  if model_type not in FAMILY_MODULES:
    raise checkpoints.CheckpointError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILY_MODULES))}")
  return importlib.import_module(FAMILY_MODULES[model_type])


def build(hf_config: dict, head: str | None = None, **overrides: Any):
  """Returns ``(module, config, dummy_inputs)``; ``head=None`` takes the family's default head."""
  fam = family(hf_config)
  return fam.build(hf_config, **overrides) if head is None else fam.build(hf_config, head, **overrides)


def init_params(module: Any, dummy_inputs: Callable, seed: int = 0) -> dict:
  """Returns freshly initialised parameters (float32)."""
  return jax.jit(module.init)(jax.random.PRNGKey(seed), *dummy_inputs())["params"]


def load_tensors(params: dict, hf_config: dict, tensors: dict, fmt: str):
  """Returns ``(params, report)`` with the checkpoint tensors loaded by the family's name map."""
  fam = family(hf_config)
  return checkpoints.load_weights(params, tensors, fmt, fam.torch_name_map, fam.BASE_PREFIX)


CAUSAL_SURVIVOR_FIELDS = ("survivors", "score_window", "keep_sinks", "keep_recent", "score_pool")


def survivor_overrides(config: Any, causal: bool = True) -> dict[str, Any]:
  """Returns a run config's survivor-rule fields as model-config overrides.

  An encoder takes ``survivors`` only (score, first, random); asking it for
  sinks or a recent window raises, naming the fields.
  """
  if causal:
    return {f: config[f] for f in CAUSAL_SURVIVOR_FIELDS if f in config}
  extra = [f for f in ("keep_sinks", "keep_recent", "score_pool") if config.get(f, 0)]
  if extra:
    raise ValueError(f"--config.{extra[0]} applies to causal LMs (GPT-2, Llama) only; "
                     "an encoder always keeps [CLS] and ranks the rest by score")
  return {"survivors": config.get("survivors", "score")}


def from_pretrained(name_or_path: str, head: str | None = None, seed: int = 0,
                    sharding: jax.sharding.Sharding | None = None,
                    **overrides: Any) -> Pretrained:
  """Returns a module with HF weights loaded from a local directory or a hub id.

  ``head=None`` takes the family's default (BERT: classification, GPT-2 and
  Llama: lm, T5: seq2seq). Parameters the checkpoint lacks (a new classification head) keep their
  random initialisation from ``seed``; ``overrides`` set config fields such as
  ``num_labels`` or ``dtype``. A ``.gguf`` file, or a directory holding one
  (and no HF weights), is read by ``gguf_loader``.

  The parameters are device arrays, placed with ``sharding`` (default: the
  default device), so a jitted call never copies the weights from the host.
  """
  pre = _from_pretrained(name_or_path, head, seed, **overrides)
  pre.params = jax.device_put(pre.params, sharding)
  return pre


def _from_pretrained(name_or_path: str, head: str | None, seed: int, **overrides: Any) -> Pretrained:
  from latadj_jax.models import gguf_loader
  gguf_file = gguf_loader.find_gguf(name_or_path)
  if gguf_file is not None:
    return _from_gguf(gguf_file, head, **overrides)
  model_dir = checkpoints.resolve_model_dir(name_or_path)
  hf_config = checkpoints.read_config(model_dir)
  module, cfg, dummy = build(hf_config, head, **overrides)
  tensors, fmt = checkpoints.read_weights(model_dir)
  if getattr(family(hf_config), "CHECKPOINT_HOLDS_ALL", False):  # no new head to initialise
    return _load_complete(module, cfg, dummy, hf_config, tensors, fmt, model_dir)
  params, report = load_tensors(init_params(module, dummy, seed), hf_config, tensors, fmt)
  return Pretrained(module, params, cfg, hf_config, model_dir, report)


def _load_complete(module, cfg, dummy, hf_config: dict, tensors: dict, fmt: str, model_dir: Path,
                   gguf_file: Path | None = None) -> Pretrained:
  """Returns a model whose every parameter comes from ``tensors``, or raises CheckpointError.

  The tensors go onto abstract shapes, so there is no init to compile (slow
  for a 30-layer model on a CPU).
  """
  abstract = jax.eval_shape(lambda: init_params(module, dummy))
  params, report = load_tensors(abstract, hf_config, tensors, fmt)
  if report.missing:
    raise checkpoints.CheckpointError(
        f"{gguf_file or model_dir} lacks parameters {report.missing[:5]} "
        f"({len(report.missing)} in all)")
  return Pretrained(module, params, cfg, hf_config, model_dir, report, gguf_file)


def _from_gguf(gguf_file: Path, head: str | None, **overrides: Any) -> Pretrained:
  """Returns a model whose every parameter comes from a GGUF file (dequantized to float32)."""
  from latadj_jax.models import gguf_loader
  hf_config, tensors = gguf_loader.read_gguf(gguf_file)
  module, cfg, dummy = build(hf_config, head, **overrides)
  return _load_complete(module, cfg, dummy, hf_config, tensors, "torch", gguf_file.parent,
                        gguf_file)
