"""The decoder variants: each is a ``DecoderConfig`` read from its HF config, plus a name map.

GPT-2: LayerNorm, GELU MLP, learned positions, biases everywhere, a fused
``c_attn`` (split into q/k/v on load) and Conv1D weights stored ``[in, out]``.
Llama: RMSNorm, SwiGLU, rotary positions, no biases (``attention_bias`` adds
them to q/k/v/o). Mistral is Llama with a sliding window; Qwen2 is Llama with
q/k/v biases. The Llama variants compile with Eigen's dots on XLA:CPU (see
``LLAMA_CPU_OPTIONS``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from latadj_jax.models import checkpoints, interface
from latadj_jax.models.decoder import DecoderConfig, DecoderLM, DecoderModel

# XLA:CPU (jaxlib 0.10) hands float32 dots to YNNPACK, whose sums carry ~13x the rounding error
# of Eigen's on SmolLM2's layer 11: there the MLP writes a 22,500-sized activation from 1,536
# products as large as 16,600, and the error (1.1e-2 against float64; Eigen 8.3e-4, torch
# 1.1e-3) reaches the logits as 1.3e-4 against HF's. Compiled with Eigen's dot they are 6.6e-5
# from HF's, as close as HF's own float32 is to its float64 (4e-5). The cost: a 512-token
# SmolLM2 prefill takes 1.57 s against YNNPACK's 1.47 s (7% slower; 2-core CPU, medians of 9).
LLAMA_CPU_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


def _src(hf_config: Any) -> dict:
  return dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())


def gpt2_config(hf_config: Any, **overrides: Any) -> DecoderConfig:
  """Returns the DecoderConfig of an HF GPT-2 config."""
  src = _src(hf_config)
  if src.get("reorder_and_upcast_attn") or src.get("add_cross_attention"):
    raise ValueError("reorder_and_upcast_attn and add_cross_attention are not supported")
  d = src.get("n_embd", 768)
  fields = dict(
      model_type="gpt2", vocab_size=src.get("vocab_size", 50257), hidden_size=d,
      intermediate_size=src.get("n_inner") or 4 * d, num_hidden_layers=src.get("n_layer", 12),
      num_attention_heads=src.get("n_head", 12), max_position_embeddings=src.get("n_positions", 1024),
      norm="layernorm", norm_eps=src.get("layer_norm_epsilon", 1e-5),
      hidden_act=src.get("activation_function", "gelu_new"), gated_mlp=False, positions="learned",
      qkv_bias=True, o_bias=True, mlp_bias=True,
      embd_pdrop=src.get("embd_pdrop", 0.1), attn_pdrop=src.get("attn_pdrop", 0.1),
      resid_pdrop=src.get("resid_pdrop", 0.1),
      tie_word_embeddings=src.get("tie_word_embeddings", True),
      bos_token_id=src.get("bos_token_id", 50256), eos_token_id=src.get("eos_token_id", 50256))
  fields.update(interface.fields_from_hf(DecoderConfig, src,
                                         skip=set(fields) | {"model_type"}))
  return DecoderConfig(**{**fields, **overrides})


def llama_config(hf_config: Any, **overrides: Any) -> DecoderConfig:
  """Returns the DecoderConfig of an HF Llama, Mistral or Qwen2 config."""
  src = _src(hf_config)
  model_type = src.get("model_type", "llama")
  if src.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {src['hidden_act']!r} is not supported; Llama uses silu")
  if model_type == "qwen2" and src.get("use_sliding_window"):
    raise ValueError("Qwen2 with use_sliding_window=True (per-layer windows) is not supported")
  # Transformers 5 keeps theta and scaling in ``rope_parameters``; 4.x in rope_theta/rope_scaling.
  rope = dict(src.get("rope_parameters") or src.get("rope_scaling") or {})
  bias = bool(src.get("attention_bias", False))
  fields = dict(
      model_type=model_type, norm="rmsnorm", norm_eps=src.get("rms_norm_eps", 1e-6),
      gated_mlp=True, positions="rope",
      rope_theta=float(rope.get("rope_theta", src.get("rope_theta", 10000.0))),
      rope_type=rope.get("rope_type", rope.get("type", "default")),
      head_dim_=src.get("head_dim"), qkv_bias=bias or model_type == "qwen2", o_bias=bias,
      sliding_window=src.get("sliding_window") if model_type == "mistral" else None,
      tie_word_embeddings=src.get("tie_word_embeddings", False),
      bos_token_id=src.get("bos_token_id", 1), eos_token_id=src.get("eos_token_id", 2),
      cpu_compiler_options=LLAMA_CPU_OPTIONS)
  for ours, theirs in (("rope_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                       ("rope_high_freq_factor", "high_freq_factor"),
                       ("rope_original_max_positions", "original_max_position_embeddings")):
    if rope.get(theirs) is not None:
      fields[ours] = rope[theirs]
  fields.update(interface.fields_from_hf(DecoderConfig, src, skip=set(fields)))
  return DecoderConfig(**{**fields, **overrides})


def _pattern(name: str) -> str:
  return re.escape(name).replace(r"\{i\}", r"(\d+)")


@dataclasses.dataclass(frozen=True)
class NameMap:
  """A variant's torch names, written as module renames, so one table serves load and export.

  ``modules`` pairs a torch module name (``{i}`` stands for a layer number)
  with ours, or with several of ours for a fused tensor that splits evenly
  along its output axis. Leaves follow from our module: embeddings and norms
  take ``weight`` as is (``embedding``, ``scale``); dense layers take it as
  ``kernel``, transposed from torch's ``Linear`` layout ``[out, in]`` unless
  the torch module matches ``conv1d`` (GPT-2's ``Conv1D`` stores ``[in, out]``).
  """
  prefix: str                    # the body's scope in HF's head model
  modules: tuple                 # ((torch module, ours or (ours, ...)), ...)
  conv1d: str = "$^"             # torch modules stored [in, out] (a regex)
  skip: str = r".*rotary_emb\..*|.*\.attn\.(bias|masked_bias)"   # buffers, not parameters

  def _leaf(self, torch_mod: str, ours: str, leaf: str) -> tuple[str, bool]:
    last = ours.rsplit(".", 1)[-1]
    if last.startswith("embed"):
      return "embedding", False
    if last.endswith("norm"):
      return ("scale" if leaf == "weight" else leaf), False
    if leaf != "weight":
      return leaf, False
    return "kernel", not re.fullmatch(self.conv1d, torch_mod)

  def __call__(self, name: str):
    """Returns ``(our path or [paths], transpose)`` for a torch tensor name, or None to skip it."""
    if re.fullmatch(self.skip, name):
      return None
    name = name[len(self.prefix) + 1:] if name.startswith(self.prefix + ".") else name
    module, _, leaf = name.rpartition(".")
    for torch_mod, ours in self.modules:
      m = re.fullmatch(_pattern(torch_mod), module)
      if m:
        fill = lambda s: s.replace("{i}", m.group(1)) if m.groups() else s
        ours = (ours,) if isinstance(ours, str) else ours
        leaves = [self._leaf(module, fill(o), leaf) for o in ours]
        paths = [tuple(fill(o).split(".")) + (our_leaf,) for o, (our_leaf, _) in zip(ours, leaves)]
        return (paths if len(paths) > 1 else paths[0]), leaves[0][1]
    return tuple(module.split(".")) + (leaf,), False  # unknown: reported as unused

  def to_torch(self, params: Any) -> dict[str, np.ndarray]:
    """Returns the float32 torch-layout tensors of ``params`` by HF name (fused ones joined)."""
    flat = {".".join(p[1:] if p[0] == "model" else p): np.asarray(v, np.float32)
            for p, v in traverse_util.flatten_dict(dict(params)).items()}
    out = {}
    for torch_mod, ours in self.modules:
      ours = (ours,) if isinstance(ours, str) else ours
      layers = {m.group(1) if m.groups() else None
                for m in (re.fullmatch(_pattern(ours[0]) + r"\.\w+", k) for k in flat) if m}
      for i in layers:
        fill = (lambda s: s.replace("{i}", i)) if i is not None else (lambda s: s)
        for leaf in ("weight", "bias"):
          leaves = [self._leaf(fill(torch_mod), fill(o), leaf) for o in ours]
          keys = [f"{fill(o)}.{our_leaf}" for o, (our_leaf, _) in zip(ours, leaves)]
          if all(k in flat for k in keys):
            value = np.concatenate([flat.pop(k) for k in keys], axis=-1)
            top = "" if torch_mod == "lm_head" else self.prefix + "."
            out[f"{top}{fill(torch_mod)}.{leaf}"] = np.ascontiguousarray(
                value.T if leaves[0][1] else value)
    if flat:
      raise checkpoints.CheckpointError(f"no torch name for parameters {sorted(flat)[:5]}")
    return out


GPT2_NAMES = NameMap("transformer", (
    ("wte", "embed_tokens"), ("wpe", "embed_positions"), ("ln_f", "norm"),
    ("h.{i}.ln_1", "layers.{i}.input_layernorm"),
    ("h.{i}.attn.c_attn", ("layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj",
                           "layers.{i}.self_attn.v_proj")),
    ("h.{i}.attn.c_proj", "layers.{i}.self_attn.o_proj"),
    ("h.{i}.ln_2", "layers.{i}.post_attention_layernorm"),
    ("h.{i}.mlp.c_fc", "layers.{i}.mlp.up_proj"),
    ("h.{i}.mlp.c_proj", "layers.{i}.mlp.down_proj"),
    ("lm_head", "lm_head")), conv1d=r"h\.\d+\.(attn|mlp)\.c_\w+")

# Llama's names are ours.
LLAMA_NAMES = NameMap("model", tuple((m, m) for m in (
    "embed_tokens", "norm", "lm_head", "layers.{i}.input_layernorm",
    "layers.{i}.post_attention_layernorm", "layers.{i}.self_attn.q_proj",
    "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj", "layers.{i}.self_attn.o_proj",
    "layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj", "layers.{i}.mlp.down_proj")))

_HEADS = {"lm": DecoderLM, "none": DecoderModel}


def _register(model_type: str, config_from_hf, names: NameMap, required: tuple, hf_class: str,
              holds_all: bool) -> interface.Family:
  return interface.register(interface.Family(
      name=model_type, kind="causal_lm", config_from_hf=config_from_hf, heads=_HEADS,
      name_map=names, to_torch=names.to_torch, base_prefix="model", required_fields=required,
      checkpoint_holds_all=holds_all, hf_classes={"lm": hf_class}), model_type)


_LLAMA_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size")
GPT2 = _register("gpt2", gpt2_config, GPT2_NAMES,
                 ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), "GPT2LMHeadModel",
                 holds_all=False)
LLAMA, MISTRAL, QWEN2 = (
    _register(t, llama_config, LLAMA_NAMES, _LLAMA_FIELDS, cls, holds_all=True)
    for t, cls in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                   ("qwen2", "Qwen2ForCausalLM")))
