"""bfloat16 parameters and activations: parity with HF PyTorch float32 at bf16's precision.

bfloat16 keeps 8 significant bits, so one rounding moves a value by up to
2**-9 of itself (0.2%). Hidden states after LayerNorm reach about 6 in size,
and six layers of matmuls, softmax and LayerNorm compound the rounding: the
measured worst error on MiniLM is 0.035 (mean 0.0035) against values up to 5.9.
The tolerances below are about 3x those measurements; the direction of every
token vector (cosine) must still agree to 1e-3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.models import Batch, Options, bert

TEXTS = ["A gripping, beautifully shot film.", "Dull.",
         "I wouldn't call it good, but the cast does what it can with a thin script."]


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir):
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  enc = tok(TEXTS, padding=True, return_tensors="np")
  hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
  return enc, ref


def _cosines(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_minilm_parity(minilm_dir, minilm_reference, param_dtype):
  enc, ref = minilm_reference
  pre = models.from_pretrained(str(minilm_dir), head="none", dtype="bfloat16",
                               param_dtype=param_dtype)
  assert {x.dtype for x in jax.tree.leaves(pre.params)} == {jnp.dtype(param_dtype)}
  out = pre.model.apply(pre.params, Batch.of(enc))
  assert out.last_hidden_state.dtype == jnp.bfloat16
  valid = enc["attention_mask"].astype(bool)
  ours = np.asarray(out.last_hidden_state, np.float32)[valid]
  err = np.abs(ours - ref[valid])
  print(f"bf16 (params {param_dtype}) MiniLM: max abs error {err.max():.3g}, "
        f"mean {err.mean():.3g}, min cosine {_cosines(ours, ref[valid]).min():.6f}")
  assert err.max() < 0.1
  assert err.mean() < 0.01
  assert _cosines(ours, ref[valid]).min() > 0.999


def test_bf16_classifier_logits_and_scores(tiny_hf_bert):
  path, hf = tiny_hf_bert
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 120, (4, 32)).astype(np.int32)
  mask = (np.arange(32)[None] < np.array([[32], [20], [9], [27]])).astype(np.int32)
  ids = ids * mask
  f32 = models.from_pretrained(str(path))
  b16 = models.from_pretrained(str(path), dtype="bfloat16", param_dtype="bfloat16")
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask)).logits.numpy()
  scores = Options(scores=True)
  out = b16.model.apply(b16.params, Batch(ids, mask), options=scores)
  assert out.logits.dtype == jnp.float32  # the head's output is float32 whatever the dtype
  np.testing.assert_allclose(np.asarray(out.logits), ref, atol=0.05, rtol=0)
  # Scores and ACC are computed in float32 from probabilities that were float32 too.
  full = f32.model.apply(f32.params, Batch(ids, mask), options=scores)
  assert out.acc.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.acc), np.asarray(full.acc), atol=0.02)


def test_bf16_elimination_keeps_nearly_the_same_tokens(tiny_hf_bert):
  path, _ = tiny_hf_bert
  f32 = models.from_pretrained(str(path))
  b16 = models.from_pretrained(str(path), dtype="bfloat16", param_dtype="bfloat16")
  ids = np.random.default_rng(1).integers(5, 120, (4, 48)).astype(np.int32)
  mask = np.ones_like(ids)
  counts = schedule.keep_counts(48, 0.8, schedule.flat_profile(3))
  a = f32.model.apply(f32.params, Batch(ids, mask), counts)
  b = b16.model.apply(b16.params, Batch(ids, mask), counts)
  assert b.last_hidden_state.shape == a.last_hidden_state.shape
  for layer, (pa, pb) in enumerate(zip(a.layer_positions, b.layer_positions)):
    pa, pb = np.asarray(pa), np.asarray(pb)
    assert (pb[:, 0] == 0).all(), "[CLS] survives in bf16 too"
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(pa, pb)])
    # Near-tied scores may swap under bf16 rounding; most choices must agree.
    assert overlap > 0.85, (layer, overlap)


def test_param_dtype_default_is_float32():
  model = models.build({"model_type": "bert", "vocab_size": 50, "hidden_size": 16,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                        "max_position_embeddings": 16}, head="none")
  assert model.config.param_dtype == "float32"
  params = model.init(0)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match="dtype"):
    bert.BertConfig(dtype="float16x")
