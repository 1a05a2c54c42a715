"""models/bert.py: BERT parity with HF PyTorch, and the Sort+Eliminate properties (issue 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from latadj_jax import models
from latadj_jax.core import elimination, schedule
from latadj_jax.models import Batch, Options, bert, stack


def _batch(vocab, lengths, n, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(len(lengths), n)).astype(np.int32)
  mask = (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0)
  types = np.zeros_like(ids)
  types[:, n // 2:] = 1
  return ids, mask, types * mask


def test_parity_random_weights_classification(tiny_hf_bert):
  path, hf = tiny_hf_bert
  pre = models.from_pretrained(str(path))
  assert pre.report.missing == [] and pre.report.unused == []
  ids, mask, types = _batch(120, [16, 9, 3], 16)
  ours = pre.model.apply(pre.params, Batch(ids, mask, types)).logits
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
  err = np.abs(np.asarray(ours) - ref).max()
  print(f"random-weights classification logits max abs error: {err:.2e}")
  assert err < 1e-4


def test_parity_real_minilm_weights(minilm_dir):
  pre = models.from_pretrained(str(minilm_dir), head="none")
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  texts = ["A gripping, beautifully shot film.", "Dull.",
           "I wouldn't call it good, but the cast does what it can with a thin script."]
  enc = tok(texts, padding=True, return_tensors="np")
  ours = np.asarray(pre.model.apply(pre.params, Batch.of(enc)).last_hidden_state)
  hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
  valid = enc["attention_mask"].astype(bool)
  err = np.abs(ours[valid] - ref[valid]).max()
  print(f"MiniLM last_hidden_state max abs error (valid tokens): {err:.2e}")
  assert err < 1e-4


@pytest.fixture(scope="module")
def tiny():
  model = models.build({"model_type": "bert", "vocab_size": 100, "hidden_size": 32,
                        "num_hidden_layers": 4, "num_attention_heads": 4,
                        "intermediate_size": 64, "max_position_embeddings": 64})
  assert isinstance(model.module, bert.BertForSequenceClassification)
  return model, model.init(0)


def test_elimination_shapes_cls_pads_and_order(tiny):
  model, params = tiny
  ids, mask, types = _batch(100, [64, 30, 12], 64)
  counts = (64, 48, 40, 11)
  out = model.apply(params, Batch(ids, mask, types), counts, options=Options(hidden=True))
  for layer, (n, h, pos) in enumerate(zip(counts, out.hidden_states[1:], out.layer_positions)):
    assert h.shape == (3, n, 32), layer
    pos = np.asarray(pos)
    assert (pos[:, 0] == 0).all(), "[CLS] must survive every layer"
    assert (np.diff(pos, axis=1) > 0).all(), "kept indices must stay in original order"
  # Row 1 has 30 valid tokens: at 40 kept, all 30 survive and only pads went.
  pos2 = np.asarray(out.layer_positions[2])
  assert set(range(30)) <= set(pos2[1].tolist())
  assert np.asarray(out.layer_positions[1])[2].tolist()[:12] == list(range(12))
  # Row 2 (12 valid) at 11 kept: all survivors are valid tokens.
  assert (np.asarray(out.mask)[2] == 1).all() and (np.asarray(out.positions)[2] < 12).all()


def test_elimination_changes_nothing_it_keeps(tiny):
  """A layer run through ``stack.run`` keeping 9 of 20 equals, at the kept positions, the same
  layer with nothing eliminated."""
  model, params = tiny
  cfg = model.config
  ids, mask, types = _batch(100, [20, 13], 20, seed=3)
  emb = bert.BertEmbeddings(cfg).apply(
      {"params": params["bert"]["embeddings"]}, ids, types,
      jnp.broadcast_to(jnp.arange(20), (2, 20)), True)
  layer = bert.BertLayer(cfg)
  lp = {"params": params["bert"]["encoder"]["layer"]["1"]}
  carry = {"valid": jnp.asarray(mask, bool), "positions": jnp.broadcast_to(jnp.arange(20), (2, 20)),
           "protect": elimination.first_token_mask(mask)}
  full = layer.apply(lp, emb, carry)

  def through_stack(bound, h, n_keep):
    return stack.run([bound], h, carry, (n_keep,), stack.Survivors.of(cfg, causal=False), Options())

  same, _, _ = layer.apply(lp, emb, 20, method=through_stack)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(full))
  cut, kept, _ = layer.apply(lp, emb, 9, method=through_stack)
  assert cut.shape == (2, 9, cfg.hidden_size)
  idx = np.asarray(kept["positions"])
  np.testing.assert_allclose(np.asarray(cut), np.take_along_axis(np.asarray(full), idx[..., None], 1),
                             atol=1e-6, rtol=0)


def test_coeff_one_flat_profile_is_no_elimination(tiny):
  model, params = tiny
  ids, mask, types = _batch(100, [33, 7], 40, seed=1)
  counts = schedule.keep_counts(40, 1.0, schedule.flat_profile(4))
  a = model.apply(params, Batch(ids, mask, types), counts).logits
  b = model.apply(params, Batch(ids, mask, types)).logits
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_trace_per_schedule(tiny):
  model, params = tiny
  traces = []

  def fwd(p, ids, mask, counts):
    traces.append(counts)
    return model.apply(p, Batch(ids, mask), counts).logits

  jitted = jax.jit(fwd, static_argnums=3)
  ids, mask, _ = _batch(100, [64, 50], 64)
  profile = (0.9, 0.8, 1.0, 1.0)
  c1 = schedule.keep_counts(64, 0.9, profile)
  c2 = schedule.keep_counts(64, 0.9001, profile)
  assert c1 == c2 and all(isinstance(n, int) for n in c1)
  jitted(params, ids, mask, c1)
  jitted(params, ids, mask, c1)
  jitted(params, ids, mask, c2)
  assert len(traces) == 1
  jitted(params, ids, mask, schedule.keep_counts(64, 0.6, profile))
  assert len(traces) == 2


def test_bad_keep_counts_raise(tiny):
  model, params = tiny
  ids, mask, _ = _batch(100, [8], 8)
  with pytest.raises(ValueError, match="keep count of layer 2"):
    model.apply(params, Batch(ids, mask), (8, 9, 4, 2))
  with pytest.raises(ValueError, match="4 layers"):
    model.apply(params, Batch(ids, mask), (8, 4))


def test_per_example_attention_equals_batched(tiny):
  # The CPU inference path (lax.map over the batch) must give the batched path's scores,
  # survivors and logits, with pads and elimination.
  model, params = tiny
  ids, mask, types = _batch(100, [40, 17, 3], 40, seed=4)
  outs = {}
  for per_example in (True, False):
    outs[per_example] = model.replace(per_example_attention=per_example).apply(
        params, Batch(ids, mask, types), (40, 30, 12, 5), options=Options(scores=True))
  a, b = outs[True], outs[False]
  np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
  np.testing.assert_array_equal(a.positions, b.positions)
  for sa, sb in zip(a.scores, b.scores):
    np.testing.assert_allclose(sa, sb, atol=1e-5)


def test_from_pretrained_hands_out_device_arrays(tiny_hf_bert):
  # Host NumPy parameters would be copied to the device on every jitted call.
  path, _ = tiny_hf_bert
  pre = models.from_pretrained(str(path))
  leaves = jax.tree.leaves(pre.params)
  assert leaves and all(isinstance(x, jax.Array) and not isinstance(x, np.ndarray) for x in leaves)
  assert {d for x in leaves for d in x.devices()} == {jax.devices()[0]}
  sharding = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.sharding.PartitionSpec())
  placed = models.from_pretrained(str(path), sharding=sharding)
  assert all(x.sharding == sharding for x in jax.tree.leaves(placed.params))
