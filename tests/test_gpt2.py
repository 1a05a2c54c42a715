"""GPT-2 parity with HF PyTorch, causal Sort+Eliminate properties, KV-cache generation (issue 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.models import gpt2
from latadj_jax.models import gpt2_generate as gen

VOCAB, N_LAYER = 256, 3


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
  """Returns (safetensors dir, torch-bin dir, torch model) of a random-init HF GPT2LMHeadModel.

  The init range is wider than GPT-2's 0.02 so that greedy generation does not
  collapse into repeating one token, which would make token-id parity weak.
  """
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=96, n_embd=64, n_layer=N_LAYER,
                                n_head=4, initializer_range=0.2, bos_token_id=None,
                                eos_token_id=None)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  st_dir = tmp_path_factory.mktemp("gpt2_st")
  model.save_pretrained(st_dir)
  bin_dir = tmp_path_factory.mktemp("gpt2_bin")
  model.save_pretrained(bin_dir, safe_serialization=False)
  if not (bin_dir / "pytorch_model.bin").exists():
    # Recent transformers always write safetensors: write the torch pickle the old way,
    # full state dict, tied lm_head.weight included.
    (bin_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  return st_dir, bin_dir, model


def _right_padded(lengths, n, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(len(lengths), n)).astype(np.int32)
  mask = (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return np.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="module")
def loaded(hf_gpt2):
  """Returns the HF model converted from each checkpoint format, by format name."""
  st_dir, bin_dir, _ = hf_gpt2
  return {"safetensors": models.from_pretrained(str(st_dir), head="lm"),
          "torch_bin": models.from_pretrained(str(bin_dir), head="lm")}


@pytest.mark.parametrize("fmt", ["safetensors", "torch_bin"])
def test_parity_random_weights_padded_batch(hf_gpt2, loaded, fmt):
  hf = hf_gpt2[2]
  pre = loaded[fmt]
  assert pre.report.missing == []
  # A tied model has no lm_head parameter: a state dict that still carries it leaves it unused.
  assert set(pre.report.unused) <= {"lm_head.weight"}
  assert "lm_head" not in pre.params
  ids, mask = _right_padded([16, 11, 4], 16)
  ours = np.asarray(pre.module.apply({"params": pre.params}, ids, mask)["logits"])
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask)).logits.numpy()
  valid = mask.astype(bool)
  err = np.abs(ours[valid] - ref[valid]).max()
  print(f"{fmt}: GPT-2 logits max abs error (valid positions): {err:.2e}")
  assert err < 1e-4
  # k = 1 with a flat profile is the same computation.
  counts = schedule.keep_counts(16, 1.0, schedule.flat_profile(N_LAYER))
  same = pre.module.apply({"params": pre.params}, ids, mask, keep_counts=counts)["logits"]
  np.testing.assert_array_equal(np.asarray(same), ours)


def test_greedy_generation_matches_hf(hf_gpt2, loaded):
  hf, pre = hf_gpt2[2], loaded["safetensors"]
  ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 10)).astype(np.int32)
  ours = np.asarray(gen.generate(pre.module, pre.params, ids, max_new_tokens=32)["tokens"])
  with torch.no_grad():
    ref = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones(2, 10, dtype=torch.long),
                      do_sample=False, max_new_tokens=32, pad_token_id=0)[:, 10:].numpy()
  print("greedy tokens row 0:", ours[0].tolist())
  assert len(set(ref[0].tolist())) > 5, "degenerate reference: the test would be weak"
  np.testing.assert_array_equal(ours, ref)


@pytest.fixture(scope="module")
def tiny():
  cfg = gpt2.GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=N_LAYER, n_head=2,
                        initializer_range=0.3)
  module = gpt2.GPT2LMHeadModel(cfg)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
  return module, params


def test_causality_with_elimination(tiny):
  module, params = tiny
  N, counts = 12, (9, 6, 4)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 50, size=(1, N)), jnp.int32)
  emb_1xNxD = params["transformer"]["wte"]["embedding"][ids]

  def layer_outputs(e):
    out = module.apply({"params": params}, None, inputs_embeds=e, keep_counts=counts,
                       output_hidden_states=True)
    return out["hidden_states"][1:]

  out = jax.jit(lambda e: module.apply({"params": params}, None, inputs_embeds=e,
                                       keep_counts=counts))(emb_1xNxD)
  jacs = jax.jit(jax.jacrev(layer_outputs))(emb_1xNxD)  # per layer: [1, K, D, 1, N, D]
  for layer, (jac, pos) in enumerate(zip(jacs, out["layer_positions"])):
    dep_KxN = np.abs(np.asarray(jac)[0, :, :, 0]).sum(axis=(1, 3))
    for slot, p in enumerate(np.asarray(pos)[0]):
      assert (dep_KxN[slot, p + 1:] == 0).all(), f"layer {layer + 1}: position {p} sees the future"
      assert dep_KxN[slot, p] > 0, f"layer {layer + 1}: position {p} lost its own input"


def test_last_token_kept_order_counts_and_scores(tiny):
  module, params = tiny
  N, counts = 12, (9, 6, 2)
  ids, mask = _right_padded([12, 7, 3], N, seed=3)
  ids, mask = ids % 50, mask.copy()
  mask[2] = 0
  mask[2, 5:9] = 1  # a left- and right-padded row: last valid position is 8
  last = [11, 6, 8]
  out = jax.jit(lambda i, m: module.apply({"params": params}, i, m, keep_counts=counts,
                                         output_scores=True, output_hidden_states=True))(ids, mask)
  assert out["logits"].shape == (3, 2, 50)
  for layer, (n, pos, h) in enumerate(zip(counts, out["layer_positions"], out["hidden_states"][1:])):
    pos = np.asarray(pos)
    assert pos.shape == (3, n) and h.shape == (3, n, 16), layer
    assert (np.diff(pos, axis=1) > 0).all(), "kept positions must stay ascending"
    for row in range(3):
      assert last[row] in pos[row], f"layer {layer + 1} dropped row {row}'s last valid token"
  # Row 1 has 7 valid tokens: at 9 kept only pads went; at 6 kept, no pad is left.
  pos1 = np.asarray(out["layer_positions"][0])[1]
  assert set(range(7)) <= set(pos1.tolist())
  assert np.asarray(out["layer_positions"][1])[1].max() <= 6
  assert out["acc"].shape == (3, N_LAYER)
  sv0 = np.asarray(out["scores"][0])
  assert (sv0[mask == 0] == 0).all() and (sv0[mask == 1] > 0).all()
  # At the kept positions, the first eliminating layer's outputs equal the full model's.
  full = jax.jit(lambda i, m: module.apply({"params": params}, i, m,
                                          output_hidden_states=True))(ids, mask)
  kept = np.take_along_axis(np.asarray(full["hidden_states"][1]),
                            np.asarray(out["layer_positions"][0])[..., None], axis=1)
  np.testing.assert_allclose(np.asarray(out["hidden_states"][1]), kept, atol=1e-5)
  with pytest.raises(ValueError, match="keep count"):
    module.apply({"params": params}, ids, mask, keep_counts=(9, 10, 2))


def _generate_without_cache(module, params, ids, lengths, T):
  """Returns greedy tokens from a full forward per step over a right-padded buffer."""
  B, N = ids.shape
  buf = np.zeros((B, N + T), np.int32)
  buf[:, :N] = ids
  mask = (np.arange(N + T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  forward = jax.jit(lambda b, m: module.apply({"params": params}, b, m)["logits"])
  rows = np.arange(B)
  out = np.zeros((B, T), np.int32)
  for t in range(T):
    at = np.asarray(lengths) + t
    logits = np.asarray(forward(buf, mask))[rows, at - 1]
    out[:, t] = buf[rows, at] = logits.argmax(-1)
    mask[rows, at] = 1
  return out


def test_kv_cache_generation(tiny):
  module, params = tiny
  N, T, lengths = 10, 12, [10, 6]
  ids, mask = _right_padded(lengths, N, seed=4)
  ids = ids % 50
  cached = gen.generate(module, params, ids, mask, max_new_tokens=T)
  assert [c["k"].shape[1] for c in cached["caches"]] == [N + T] * N_LAYER
  expected = _generate_without_cache(module, params, ids, lengths, T)
  assert len(set(expected[0].tolist())) > 3, "degenerate reference: the test would be weak"
  np.testing.assert_array_equal(np.asarray(cached["tokens"]), expected)

  counts = (7, 5, 3)
  elim = gen.generate(module, params, ids, mask, max_new_tokens=T, keep_counts=counts)
  sizes = [(c["k"].shape[1], c["v"].shape[1], c["valid"].shape[1]) for c in elim["caches"]]
  assert sizes == [(n + T,) * 3 for n in (N,) + counts[:-1]]
  # Every new token is valid in every layer's cache after decoding (all but the last slot).
  for c in elim["caches"]:
    assert np.asarray(c["valid"])[:, -T:-1].all() and not np.asarray(c["valid"])[:, -1].any()
  # The first new token is the argmax of the eliminating forward at the last valid token.
  logits = jax.jit(lambda i, m: module.apply({"params": params}, i, m, keep_counts=counts))(ids, mask)
  pos = np.asarray(logits["positions"])
  first = [np.asarray(logits["logits"])[r, list(pos[r]).index(lengths[r] - 1)].argmax()
           for r in range(2)]
  np.testing.assert_array_equal(np.asarray(elim["tokens"])[:, 0], first)


def test_select_token_greedy_and_top_k():
  logits_BxV = jax.random.normal(jax.random.PRNGKey(0), (64, 20))
  greedy = np.asarray(gen.select_token(logits_BxV, None))
  np.testing.assert_array_equal(greedy, np.asarray(logits_BxV).argmax(-1))
  # Top-1 sampling is greedy, whatever the temperature.
  top1 = gen.select_token(logits_BxV, jax.random.PRNGKey(1), temperature=5.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  top3_BxK = np.argsort(-np.asarray(logits_BxV), axis=-1)[:, :3]
  draws = np.stack([np.asarray(gen.select_token(logits_BxV, jax.random.PRNGKey(s), 2.0, 3))
                    for s in range(8)], axis=1)
  assert all(set(d) <= set(t) for d, t in zip(draws, top3_BxK)), "sampled outside the top k"
  assert (draws != greedy[:, None]).any(), "temperature sampling never left the argmax"


def test_build_surface_and_name_map():
  module, cfg, dummy = models.build({"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                     "n_head": 2, "vocab_size": 40, "dtype": "bfloat16"}, "lm")
  assert isinstance(module, gpt2.GPT2LMHeadModel) and cfg.dtype == "float32"
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *dummy())["params"]
  assert shapes["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"].shape == (96, 32)  # [out, in]
  body, _, _ = gpt2.build({"n_layer": 2, "n_embd": 32, "n_head": 2}, head="none")
  assert isinstance(body, gpt2.GPT2Module)
  with pytest.raises(ValueError, match="no 'cls' head"):
    gpt2.build({}, head="cls")
  assert gpt2.torch_name_map("h.0.attn.bias") is None
  assert gpt2.torch_name_map("transformer.h.0.attn.c_proj.weight") == (
      ("transformer", "h", "0", "attn", "c_proj", "kernel"), True)
  assert gpt2.torch_name_map("transformer.ln_f.weight") == (("transformer", "ln_f", "scale"), False)
