"""Tiny decoders shared by the decoder tests: random HF checkpoints, our tiny models, batches.

Helpers, not fixtures: each test file wraps what it needs in its own
module-scoped fixture, so ``pytest tests/test_generate.py`` alone builds only
what that file uses.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import transformers

from latadj_jax import models
from latadj_jax.models import Batch

N_LAYER = 3

# --- random HF checkpoints (the parity references) ----------------------------------------------
GPT2_VOCAB = 256
LLAMA_VOCAB = 260
LLAMA_SMALL = dict(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=N_LAYER, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=96, bos_token_id=None, eos_token_id=None,
                   attn_implementation="eager")
# Wider than the usual 0.02 init, so greedy decoding does not collapse onto one token.
LLAMA_VARIANTS = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(initializer_range=0.2, rope_theta=500.0)),
    "llama3_rope_tied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, attention_bias=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral_window5": (transformers.MistralConfig, dict(sliding_window=5, head_dim=16)),
    "qwen2_qkv_bias": (transformers.Qwen2Config, dict(initializer_range=0.1)),
}


def hf_gpt2(st_dir: Path, bin_dir: Path | None = None):
  """Returns a random-init HF GPT2LMHeadModel saved as safetensors (and a torch pickle).

  The init range is wider than GPT-2's 0.02 so that greedy generation does not
  collapse into repeating one token, which would make token-id parity weak.
  """
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=96, n_embd=64, n_layer=N_LAYER,
                                n_head=4, initializer_range=0.2, bos_token_id=None,
                                eos_token_id=None)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  model.save_pretrained(st_dir)
  if bin_dir is not None:
    model.save_pretrained(bin_dir, safe_serialization=False)
    if not (bin_dir / "pytorch_model.bin").exists():
      # Recent transformers always write safetensors: write the torch pickle the old way,
      # full state dict, tied lm_head.weight included.
      (bin_dir / "model.safetensors").unlink()
      torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  return model


def hf_llama(variant: str, path: Path):
  """Returns a random-init HF Llama-family LM of ``LLAMA_VARIANTS[variant]``, saved to ``path``."""
  cls, extra = LLAMA_VARIANTS[variant]
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cls(**LLAMA_SMALL, **extra)).eval()
  model.save_pretrained(path)
  return model


def torch_logits(model, ids, mask):
  """Returns HF's logits, with position ids counted from each row's first valid token.

  HF's forward counts RoPE positions from slot 0; generate's rule (and ours)
  starts each row at its first valid token, so they are passed explicitly.
  """
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()


def hf_greedy(model, ids, max_new_tokens):
  """Returns HF's greedy continuation of unpadded prompts (the new tokens only)."""
  B, N = ids.shape
  with torch.no_grad():
    out = model.generate(torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.ones(B, N, dtype=torch.long), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=0)
  return out[:, N:].numpy()


# --- our tiny models (random Flax init) ---------------------------------------------------------
TINY_VOCAB = 50
TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=TINY_VOCAB, n_positions=64, n_embd=16,
                 n_layer=N_LAYER, n_head=2, initializer_range=0.3),
    "llama": dict(model_type="llama", vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=N_LAYER, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, initializer_range=0.3),
}


@functools.lru_cache(maxsize=None)
def tiny(variant: str):
  """Returns (Model, params) of a tiny random decoder: ``"gpt2"`` or ``"llama"`` (GQA)."""
  model = models.build(TINY[variant])
  return model, model.init(0)


# --- batches and references ---------------------------------------------------------------------
def right_padded(lengths, n, vocab, seed=0):
  """Returns (ids, mask): rows of ``lengths`` valid tokens, right-padded with id 0 to ``n``."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(len(lengths), n)).astype(np.int32)
  mask = (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return np.where(mask == 1, ids, 0), mask


def padded_batch(vocab, n=16, seed=0):
  """Returns ids and a mask with a full row, a right-padded row and a left-padded row."""
  ids = np.random.default_rng(seed).integers(0, vocab, (3, n)).astype(np.int32)
  mask = np.ones((3, n), np.int32)
  mask[1, 11:] = 0
  mask[2, :5] = 0
  return ids, mask


def generate_without_cache(model, params, ids, lengths, T):
  """Returns greedy tokens from a full forward per step over a right-padded buffer."""
  import jax
  B, N = ids.shape
  buf = np.zeros((B, N + T), np.int32)
  buf[:, :N] = ids
  mask = (np.arange(N + T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  forward = jax.jit(lambda b, m: model.apply(params, Batch(b, m)).logits)
  rows, out = np.arange(B), np.zeros((B, T), np.int32)
  for t in range(T):
    at = np.asarray(lengths) + t
    out[:, t] = buf[rows, at] = np.asarray(forward(buf, mask))[rows, at - 1].argmax(-1)
    mask[rows, at] = 1
  return out
