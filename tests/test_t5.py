"""models/t5.py and t5_layers.py: T5 parity with HF PyTorch, greedy generation (t5_generate),
relative bias after elimination (issue 6)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.t5.modeling_t5 import T5Attention

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.models import Batch, Options, t5, t5_generate, t5_layers

VOCAB = 160


def _hf_t5(path, feed_forward_proj: str, tied: bool, std: float | None = None):
  """Returns an HF T5 with random weights, saved to ``path`` as a v1.0 or v1.1 checkpoint.

  ``std`` redraws every weight but the norms (HF's init makes the tiny tied
  model emit nothing but pads); larger values make float32 ill-conditioned.
  """
  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=32, feed_forward_proj=feed_forward_proj,
      tie_word_embeddings=tied, dropout_rate=0.0, decoder_start_token_id=0)
  hf = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if std is not None and "layer_norm" not in name:
        p.normal_(0.0, std)
  hf.save_pretrained(path)
  if not tied:
    # transformers 5 always ties T5's head on save; write the real Flan-T5 layout
    # instead (a separate lm_head.weight, tie_word_embeddings false), which it loads untied.
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["shared.weight"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("scale_decoder_outputs", None)
    (path / "config.json").write_text(json.dumps(config))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
  return hf


V1_0, V1_1 = ("relu", True, 0.3), ("gated-gelu", False, None)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  """Returns a loader of (HF torch model, our Pretrained), each variant built once."""
  cache = {}
  def load(variant):
    if variant not in cache:
      path = tmp_path_factory.mktemp(variant[0])
      hf = _hf_t5(path, *variant)
      cache[variant] = hf, models.from_pretrained(str(path), head="seq2seq")
    return cache[variant]
  return load


@pytest.fixture(scope="module", params=[V1_0, V1_1], ids=["t5_v1_0", "flan_t5_v1_1"])
def pair(request, zoo):
  """Returns (HF torch model, our Pretrained) for one T5 variant."""
  return zoo(request.param)


@functools.lru_cache(maxsize=None)
def _jitted(model, method, static: tuple):
  return jax.jit(lambda params, *a: model.method(method, params, *a, *static))


def _run(pre, method, *args, static=()):
  """Returns ``pre.model.method(method, ...)``, jitted once per (model, method, static args).

  ``args`` are arrays (a Batch too); ``static`` follow them: keep counts, Options.
  """
  return _jitted(pre.model, method, tuple(static))(pre.params, *args)


def _batch(lengths, n, seed=0):
  rng = np.random.default_rng(seed)
  mask = (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return rng.integers(2, VOCAB, size=(len(lengths), n)).astype(np.int32) * mask, mask


def test_parity_logits_with_padding(pair):
  hf, pre = pair
  assert pre.report.missing == [] and pre.report.unused == []
  assert ("lm_head/kernel" in pre.report.loaded) == (not pre.model.config.tie_word_embeddings)
  ids, mask = _batch([20, 13, 5], 20)
  dec = np.random.default_rng(1).integers(2, VOCAB, size=(3, 6)).astype(np.int32)
  dec[:, 0] = 0
  ours = _run(pre, "__call__", Batch(ids, mask, decoder_input_ids=dec)).logits
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
  err = np.abs(np.asarray(ours) - ref).max()
  print(f"{pre.model.config.feed_forward_proj} logits max abs error: {err:.2e} "
        f"(max |logit| {np.abs(ref).max():.1f})")
  assert err < 1e-4


def test_greedy_generation_matches_hf(pair):
  hf, pre = pair
  ids, mask = _batch([20, 13, 5], 20, seed=2)
  ours = np.asarray(t5_generate.generate(pre.model, pre.params, ids, mask,
                                         max_new_tokens=10)["tokens"])
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
                      max_new_tokens=10).numpy()
  assert ref[:, 0].tolist() == [0, 0, 0]  # the decoder start token, which ours leaves out
  n = ref.shape[1] - 1  # HF stops once every row has emitted EOS; ours pads to the end
  np.testing.assert_array_equal(ours[:, :n], ref[:, 1:])
  assert (ours[:, n:] == pre.model.config.pad_token_id).all()
  assert len(set(ours.ravel().tolist())) > 3  # the comparison is not between constant outputs


def _direct_bias(table_RxH, pos_BxK, bidirectional=True):
  """Returns table[bucket(pos_j - pos_i)] as BxHxKxK, with HF's own (torch) bucket function."""
  rel = torch.tensor(pos_BxK[:, None, :] - pos_BxK[:, :, None], dtype=torch.long)
  bucket = T5Attention._relative_position_bucket(rel, bidirectional, table_RxH.shape[0], 128)
  return np.moveaxis(np.asarray(table_RxH)[bucket.numpy()], -1, 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_matches_hf_over_long_distances(bidirectional):
  rel = np.arange(-1500, 1501)
  ours = t5_layers.relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional, 32, 128)
  ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, 32, 128)
  np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_position_bias_uses_original_distance():
  table = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
  rng = np.random.default_rng(1)
  pos = np.stack([np.sort(rng.choice(600, 40, replace=False)) for _ in range(2)]).astype(np.int32)
  ours = t5_layers.position_bias(jnp.asarray(table), jnp.asarray(pos), jnp.asarray(pos), True, 128)
  np.testing.assert_array_equal(np.asarray(ours), _direct_bias(table, pos))


@pytest.fixture(scope="module")
def flan(zoo):
  """Returns our tiny random Flan-style (v1.1) model."""
  return zoo(V1_1)[1]


def test_relative_bias_after_elimination_in_the_model(flan, monkeypatch):
  ids, mask = _batch([24, 17], 24, seed=3)
  counts = (15, 9)
  original, biases = t5_layers.position_bias, []

  def recording(*args):
    biases.append(original(*args))
    return biases[-1]

  monkeypatch.setattr(t5_layers, "position_bias", recording)
  out = flan.model.method("encode", flan.params, Batch(ids, mask), counts)  # eager: biases are arrays
  assert len(biases) == 2  # one bias for the full input, one for layer 1's survivors
  pos = np.asarray(out.layer_positions[0])
  assert (pos != np.arange(counts[0])).any()  # the survivors are not simply the first slots
  table = flan.params["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"][
      "relative_attention_bias"]["embedding"]
  np.testing.assert_allclose(np.asarray(biases[1]), _direct_bias(table, pos), rtol=0, atol=0)


def test_encoder_elimination_counts_positions_and_masks(flan):
  ids, mask = _batch([24, 17, 6], 24, seed=4)
  counts = schedule.keep_counts(24, 0.75, schedule.flat_profile(2))
  assert counts == (18, 13)
  enc = _run(flan, "encode", Batch(ids, mask), static=(counts, Options(scores=True)))
  for layer_pos, n in zip(enc.layer_positions, counts):
    assert layer_pos.shape == (3, n)
    assert (np.diff(np.asarray(layer_pos), axis=-1) > 0).all()  # ascending original order
  pos, kept_mask = np.asarray(enc.positions), np.asarray(enc.mask)
  assert enc.last_hidden_state.shape == (3, 13, 32)
  np.testing.assert_array_equal(kept_mask, np.take_along_axis(mask, pos, 1).astype(bool))
  np.testing.assert_array_equal(kept_mask.sum(-1), [13, 13, 6])  # pads go first
  assert enc.acc.shape == (3, 2) and len(enc.scores) == 2

  # Cross-attention sees exactly the survivors: scattering them back to their
  # original slots among junk states that the mask hides changes nothing.
  dec = np.zeros((3, 4), np.int32)
  apply = lambda *a: _run(flan, "decode", *a)
  kept = apply(dec, enc.last_hidden_state, enc.mask)
  junk = np.random.default_rng(5).normal(size=(3, 24, 32)).astype(np.float32)
  rows = np.arange(3)[:, None]
  junk[rows, pos] = np.asarray(enc.last_hidden_state)
  full_mask = np.zeros((3, 24), bool)
  full_mask[rows, pos] = kept_mask
  np.testing.assert_allclose(np.asarray(apply(dec, junk, full_mask)), np.asarray(kept), atol=1e-5)
  unmasked = apply(dec, junk, np.ones((3, 24), bool))
  assert np.abs(np.asarray(unmasked) - np.asarray(kept)).max() > 1e-3


def test_no_elimination_equals_none_and_generation_with_elimination(flan):
  ids, mask = _batch([16, 11], 16, seed=6)
  enc = lambda counts: _run(flan, "encode", Batch(ids, mask), static=(counts,))
  full, flat = enc(None), enc(schedule.keep_counts(16, 1.0, schedule.flat_profile(2)))
  np.testing.assert_array_equal(np.asarray(flat.last_hidden_state),
                                np.asarray(full.last_hidden_state))

  # The cached decode loop agrees with teacher-forced decoding over the same survivors.
  counts = (12, 8)
  out = t5_generate.generate(flan.model, flan.params, ids, mask, max_new_tokens=6,
                             keep_counts=counts)
  assert out["encoder"].last_hidden_state.shape == (2, 8, 32)
  tokens = np.asarray(out["tokens"])
  dec = np.concatenate([np.zeros((2, 1), np.int32), tokens[:, :-1]], axis=1)
  logits = _run(flan, "decode", dec, out["encoder"].last_hidden_state, out["encoder"].mask)
  greedy = np.asarray(jnp.argmax(logits, -1))
  for row in range(2):
    eos = np.flatnonzero(tokens[row] == flan.model.config.eos_token_id)
    stop = eos[0] + 1 if len(eos) else tokens.shape[1]
    np.testing.assert_array_equal(tokens[row, :stop], greedy[row, :stop])


def test_build_rejects_unknown_head_and_maps_torch_names():
  with pytest.raises(ValueError, match="seq2seq"):
    models.build({"model_type": "t5", "d_model": 32}, head="classification")
  assert t5.torch_name_map("encoder.embed_tokens.weight") is None
  assert t5.torch_name_map("shared.weight") == (("shared", "embedding"), False)
  assert t5.torch_name_map("lm_head.weight") == (("lm_head", "kernel"), True)
  bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  assert t5.torch_name_map(bias) == (tuple(bias.split(".")[:-1]) + ("embedding",), False)
  assert t5.torch_name_map("encoder.final_layer_norm.weight") == (
      ("encoder", "final_layer_norm", "weight"), False)
