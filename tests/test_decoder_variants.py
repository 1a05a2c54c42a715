"""models/decoder_variants.py: GPT-2, Llama, Mistral and Qwen2 against HF (issues 5, 16, 40).

Each variant is a ``DecoderConfig`` read from its HF config plus a name map:
random HF checkpoints load with nothing missing or unused, their logits
match HF's within 1e-4 on a padded batch, the name maps send torch names to
our paths, and ``to_torch`` (export) and a Flax msgpack give the same
tensors back.
"""

import jax
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util

from decoder_fixtures import (GPT2_VOCAB, LLAMA_VARIANTS, LLAMA_VOCAB, N_LAYER, hf_gpt2, hf_llama,
                              padded_batch, right_padded, torch_logits)
from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.models import Batch, decoder, decoder_variants


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
  """Returns (safetensors dir, torch-bin dir, torch model) of a random-init HF GPT2LMHeadModel."""
  st_dir, bin_dir = tmp_path_factory.mktemp("gpt2_st"), tmp_path_factory.mktemp("gpt2_bin")
  return st_dir, bin_dir, hf_gpt2(st_dir, bin_dir)


@pytest.fixture(scope="module")
def loaded(gpt2_dirs):
  """Returns the HF model converted from each checkpoint format, by format name."""
  st_dir, bin_dir, _ = gpt2_dirs
  return {"safetensors": models.from_pretrained(str(st_dir), head="lm"),
          "torch_bin": models.from_pretrained(str(bin_dir), head="lm")}


def _assert_matches_hf(pre, ids, mask, ref, label: str) -> None:
  """Our logits equal HF's within 1e-4 at the valid positions, and k = 1 (flat) changes nothing."""
  ours = np.asarray(pre.model.apply(pre.params, Batch(ids, mask)).logits)
  valid = mask.astype(bool)
  err = np.abs(ours[valid] - ref[valid]).max()
  print(f"{label}: logits max abs error (valid positions): {err:.2e}")
  assert err < 1e-4
  counts = schedule.keep_counts(ids.shape[1], 1.0, schedule.flat_profile(N_LAYER))
  same = pre.model.apply(pre.params, Batch(ids, mask), counts).logits
  np.testing.assert_array_equal(np.asarray(same), ours)


@pytest.mark.parametrize("fmt", ["safetensors", "torch_bin"])
def test_gpt2_parity_random_weights_padded_batch(gpt2_dirs, loaded, fmt):
  hf = gpt2_dirs[2]
  pre = loaded[fmt]
  assert pre.report.missing == []
  # A tied model has no lm_head parameter: a state dict that still carries it leaves it unused.
  assert set(pre.report.unused) <= {"lm_head.weight"}
  assert "lm_head" not in pre.params
  ids, mask = right_padded([16, 11, 4], 16, GPT2_VOCAB)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask)).logits.numpy()
  _assert_matches_hf(pre, ids, mask, ref, f"{fmt}: GPT-2")


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_parity_with_hf_random_weights(variant, tmp_path):
  hf = hf_llama(variant, tmp_path)
  pre = models.from_pretrained(str(tmp_path))
  assert isinstance(pre.model.module, decoder.DecoderLM)
  assert pre.model.config.model_type == hf.config.model_type == pre.model.family.name
  assert pre.report.missing == [] and pre.report.unused == []
  assert ("lm_head" in pre.params) != pre.model.config.tie_word_embeddings
  ids, mask = padded_batch(LLAMA_VOCAB)
  _assert_matches_hf(pre, ids, mask, torch_logits(hf, ids, mask), variant)


@pytest.mark.parametrize("variant", ["gpt2", "mistral_window5"])
def test_export_and_msgpack_give_the_checkpoint_back(variant, tmp_path):
  """``family.to_torch`` inverts the name map (GPT-2's fused c_attn and Conv1D layout included),
  and our parameters saved as a Flax msgpack load back unchanged."""
  hf = (hf_gpt2(tmp_path) if variant == "gpt2" else hf_llama(variant, tmp_path))
  pre = models.from_pretrained(str(tmp_path))
  family = pre.model.family
  exported = family.to_torch(pre.params)
  state = {k: v.numpy() for k, v in hf.state_dict().items() if family.name_map(k) is not None}
  if pre.model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  assert sorted(exported) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  msg_dir = tmp_path / "msgpack"
  msg_dir.mkdir()
  (msg_dir / "config.json").write_text((tmp_path / "config.json").read_text())
  (msg_dir / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(jax.tree.map(np.asarray, pre.params)))
  again = models.from_pretrained(str(msg_dir))
  assert again.report.missing == [] and again.report.unused == []
  for path, value in traverse_util.flatten_dict(pre.params).items():
    np.testing.assert_array_equal(
        np.asarray(traverse_util.flatten_dict(again.params)[path]), np.asarray(value))


def test_gpt2_build_surface_and_name_map():
  model = models.build({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2,
                        "vocab_size": 40, "dtype": "bfloat16"}, "lm")
  # HF's dtype is the checkpoint's storage type, never our activation type.
  assert isinstance(model.module, decoder.DecoderLM) and model.config.dtype == "float32"
  shapes = model.abstract_params()
  attn = shapes["model"]["layers"]["1"]["self_attn"]
  assert {n: attn[n]["kernel"].shape for n in attn} == {  # c_attn, split; [in, out]
      "q_proj": (32, 32), "k_proj": (32, 32), "v_proj": (32, 32), "o_proj": (32, 32)}
  assert shapes["model"]["embed_positions"]["embedding"].shape == (1024, 32)
  body = models.build({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2},
                      head="none")
  assert isinstance(body.module, decoder.DecoderModel)
  with pytest.raises(ValueError, match="no 'cls' head"):
    models.build({"model_type": "gpt2"}, head="cls")
  names = decoder_variants.GPT2_NAMES
  assert names("h.0.attn.bias") is None
  # Conv1D stores [in, out]: no transpose.
  assert names("transformer.h.0.attn.c_proj.weight") == (
      ("layers", "0", "self_attn", "o_proj", "kernel"), False)
  assert names("transformer.ln_f.weight") == (("norm", "scale"), False)
  assert names("transformer.h.1.attn.c_attn.bias") == (
      [("layers", "1", "self_attn", p, "bias") for p in ("q_proj", "k_proj", "v_proj")], False)
  assert names("transformer.h.1.mlp.c_fc.weight") == (("layers", "1", "mlp", "up_proj", "kernel"),
                                                      False)
  assert names("transformer.wpe.weight") == (("embed_positions", "embedding"), False)


def test_llama_config_validation_and_name_map():
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    decoder_variants.llama_config({"model_type": "llama",
                                   "rope_scaling": {"type": "yarn", "factor": 2}})
  with pytest.raises(ValueError, match="use_sliding_window"):
    decoder_variants.llama_config({"model_type": "qwen2", "use_sliding_window": True})
  with pytest.raises(ValueError, match="hidden_act"):
    decoder_variants.llama_config({"model_type": "llama", "hidden_act": "gelu"})
  old = decoder_variants.llama_config({"model_type": "llama", "rope_theta": 5e5,
                                       "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert (old.rope_theta, old.rope_type, old.rope_factor) == (5e5, "linear", 2.0)
  names = decoder_variants.LLAMA_NAMES
  assert names("model.layers.0.self_attn.rotary_emb.inv_freq") is None
  assert names("model.layers.2.mlp.gate_proj.weight") == (
      ("layers", "2", "mlp", "gate_proj", "kernel"), True)
  assert names("model.layers.0.input_layernorm.weight") == (
      ("layers", "0", "input_layernorm", "scale"), False)
  assert names("model.embed_tokens.weight") == (("embed_tokens", "embedding"), False)
  assert names("lm_head.weight") == (("lm_head", "kernel"), True)
  # Every mapped path is a parameter of the model, under the body's scope "model".
  shapes = traverse_util.flatten_dict(models.build(
      {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 16, "num_attention_heads": 2,
       "intermediate_size": 24, "vocab_size": 30}).abstract_params())
  for name in ("model.layers.2.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight",
               "model.embed_tokens.weight"):
    assert ("model",) + names(name)[0] in shapes, name
  assert ("lm_head", "kernel") in shapes


@pytest.mark.parametrize("model_type, fields", [
    ("mistral", dict(sliding_window=7, qkv_bias=False)),
    ("qwen2", dict(sliding_window=None, qkv_bias=True, o_bias=False)),
    ("llama", dict(sliding_window=None, qkv_bias=False, positions="rope", norm="rmsnorm")),
])
def test_variant_configs_from_hf(model_type, fields):
  """A variant is a config: Mistral keeps its window, Qwen2 biases q/k/v, each keeps its name."""
  cfg = models.build({"model_type": model_type, "num_hidden_layers": 1, "hidden_size": 16,
                      "num_attention_heads": 2, "intermediate_size": 24, "vocab_size": 30,
                      "sliding_window": 7}).config
  assert cfg.model_type == model_type
  assert {f: getattr(cfg, f) for f in fields} == fields
  gpt2 = decoder_variants.gpt2_config({"n_layer": 1, "n_embd": 16, "n_head": 2, "n_inner": None})
  assert (gpt2.norm, gpt2.positions, gpt2.gated_mlp, gpt2.intermediate_size) == (
      "layernorm", "learned", False, 64)
