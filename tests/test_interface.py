"""models/interface.py and models/__init__.py: one interface for every family (issue 40).

The registry knows every HF ``model_type`` we run; ``Batch``, ``Model`` and
``check_keep_counts`` behave as documented; every family returns the same
``Output``; and the package has one eliminating layer loop, ``stack.run``,
which no code outside ``models/`` reaches past to a family's module.
"""

import ast
import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from latadj_jax import models
from latadj_jax.models import Batch, Options, Output, checkpoints, interface

PACKAGE = Path(models.__file__).resolve().parents[1]
TINY = {
    "bert": dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, num_labels=3),
    "gpt2": dict(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32),
    "llama": dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32),
    "mistral": dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, max_position_embeddings=32, sliding_window=4),
    "qwen2": dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=24, max_position_embeddings=32),
    "t5": dict(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4),
}
KINDS = {"bert": "classifier", "gpt2": "causal_lm", "llama": "causal_lm", "mistral": "causal_lm",
         "qwen2": "causal_lm", "t5": "seq2seq"}


def _tiny(model_type: str) -> models.Model:
  return models.build({"model_type": model_type, **TINY[model_type]})


def test_registry_knows_every_model_type_and_names_them_for_an_unknown_one():
  assert set(interface.registered()) == set(KINDS)
  for model_type, kind in KINDS.items():
    family = models.get(model_type)
    assert family.name == model_type and family.kind == kind
    assert family.causal == (kind == "causal_lm")
    assert models.required_fields()[model_type] == family.required_fields
  with pytest.raises(checkpoints.CheckpointError,
                     match="unsupported model_type 'reformer'; supported: bert, gpt2, llama, "
                           "mistral, qwen2, t5"):
    models.get("reformer")
  with pytest.raises(checkpoints.CheckpointError, match="unsupported model_type ''"):
    models.build({"hidden_size": 16})
  with pytest.raises(ValueError, match="bert has no 'lm' head; use one of"):
    models.build({"model_type": "bert"}, head="lm")


def test_batch_of_takes_the_model_fields_and_leaves_the_rest():
  ids, mask = np.ones((2, 5), np.int32), np.ones((2, 5), np.int32)
  batch = Batch.of({"input_ids": ids, "attention_mask": mask, "labels": np.zeros(2),
                    "example_id": [3, 4]})
  assert batch.input_ids is ids and batch.attention_mask is mask
  assert batch.token_type_ids is None and batch.decoder_input_ids is None
  only = Batch.of({"input_ids": ids})
  assert only.input_ids is ids and only[1:] == (None,) * (len(Batch._fields) - 1)
  with pytest.raises(TypeError, match="input_ids"):
    Batch.of({"attention_mask": mask})  # input_ids is required


def test_model_replace_and_with_dropout_rebuild_the_module():
  bert = _tiny("bert")
  three = bert.replace(num_labels=5)
  assert three.config.num_labels == 5 and three.module.config is three.config
  assert bert.config.num_labels == 3  # frozen: the original is untouched
  assert three.abstract_params()["classifier"]["kernel"].shape == (16, 5)
  wet = bert.with_dropout(0.25)
  assert (wet.config.hidden_dropout_prob, wet.config.attention_probs_dropout_prob) == (0.25, 0.25)
  assert dataclasses.replace(wet.config, hidden_dropout_prob=bert.config.hidden_dropout_prob,
                             attention_probs_dropout_prob=bert.config.attention_probs_dropout_prob
                             ) == bert.config
  llama = _tiny("llama").with_dropout(0.5)
  assert (llama.config.embd_pdrop, llama.config.attn_pdrop, llama.config.resid_pdrop) == (0.5,) * 3
  t5 = _tiny("t5")
  assert t5.with_dropout(0.5) == t5  # T5 is inference-only: nothing to set
  # Equal configs are equal models, so jitted functions keyed on a model compile once.
  assert bert.replace() == bert and hash(bert.replace()) == hash(bert)
  with pytest.raises(TypeError):
    bert.replace(no_such_field=1)


def test_check_keep_counts_errors_name_the_layer_and_the_bound():
  assert interface.check_keep_counts(None, 10, 3) == (10, 10, 10)
  assert interface.check_keep_counts([10, 6, 6], 10, 3) == (10, 6, 6)
  with pytest.raises(ValueError, match="keep_counts has 2 entries; the model has 3 layers"):
    interface.check_keep_counts((8, 6), 10, 3)
  with pytest.raises(ValueError, match=r"keep count of layer 2 must be a Python int in \[1, 6\]"):
    interface.check_keep_counts((6, 7, 2), 10, 3)
  with pytest.raises(ValueError, match=r"layer 1 must be a Python int in \[1, 10\]"):
    interface.check_keep_counts((11, 7, 2), 10, 3)
  with pytest.raises(ValueError, match=r"layer 3 .*got 0"):
    interface.check_keep_counts((6, 4, 0), 10, 3)
  with pytest.raises(ValueError, match="Python int"):  # a traced or numpy count would recompile
    interface.check_keep_counts((6, np.int64(4), 2), 10, 3)


@pytest.mark.parametrize("model_type", sorted(KINDS))
def test_every_family_returns_the_same_output(model_type):
  model = _tiny(model_type)
  assert model.kind == KINDS[model_type] and model.num_layers == 2 and model.vocab_size == 40
  assert model.max_positions == (None if model_type == "t5" else 32)
  ids = np.random.default_rng(0).integers(1, 40, (2, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  dec = np.zeros((2, 3), np.int32) if model.kind == "seq2seq" else None
  batch = Batch(ids, mask, decoder_input_ids=dec)
  params = model.init(0)
  out = model.apply(params, batch, (6, 4), options=Options(scores=True, hidden=True, kv=True))
  assert type(out) is Output
  D = 16
  assert out.last_hidden_state.shape == (2, 4, D)
  assert out.mask.shape == out.positions.shape == (2, 4) and out.mask.dtype == jnp.bool_
  assert [p.shape for p in out.layer_positions] == [(2, 6), (2, 4)]
  assert [s.shape for s in out.scores] == [(2, 8), (2, 6)] and out.acc.shape == (2, 2)
  assert len(out.hidden_states) == 3
  want_logits = {"classifier": (2, 3), "causal_lm": (2, 4, 40), "seq2seq": (2, 3, 40)}
  assert out.logits.shape == want_logits[model.kind]
  assert out.logits.dtype == jnp.float32
  assert (out.pooled is not None) == (model_type == "bert")
  # Decoders hand out what each layer attended over, for a KV cache; the others have no cache.
  if model.kind == "causal_lm":
    assert [x["k"].shape[1] for x in out.kv] == [8, 6]
  else:
    assert out.kv is None
  plain = model.apply(params, batch, (6, 4))
  assert plain.scores is plain.acc is plain.hidden_states is plain.kv is None
  np.testing.assert_allclose(np.asarray(plain.logits), np.asarray(out.logits), atol=1e-6)


def _package_modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text())


def _calls(tree, owner: str, names: set[str]):
  """Yields the calls ``owner.<name>(...)`` in ``tree`` for ``name`` in ``names``."""
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in names and isinstance(node.func.value, ast.Name)
        and node.func.value.id == owner):
      yield node


def test_one_eliminating_loop_in_the_package():
  """``stack.run`` is the only layer loop that eliminates; every family calls it."""
  selection = {"eliminate", "ranking", "select_indices", "gather", "score_queries"}
  where = {path for path, tree in _package_modules()
           if path != "latadj_jax/core/elimination.py"
           and any(_calls(tree, "elimination", selection))}
  assert where == {"latadj_jax/models/stack.py"}, where
  # A loop (or comprehension) whose body splits a layer at the Eliminate point: stack.run's only.
  loops = []
  for path, tree in _package_modules():
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        if isinstance(node, (ast.For, ast.ListComp, ast.GeneratorExp, ast.DictComp)):
          body = node.body if isinstance(node, ast.For) else [node]
          if any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                 and c.func.attr in ("attend", "finish")
                 for b in body for c in ast.walk(b)):
            loops.append((path, fn.name))
  assert loops == [("latadj_jax/models/stack.py", "run")], loops
  runners = sorted(path for path, tree in _package_modules() if any(_calls(tree, "stack", {"run"})))
  assert runners == ["latadj_jax/models/bert.py", "latadj_jax/models/decoder.py",
                     "latadj_jax/models/t5.py"]


def test_code_outside_models_never_imports_a_family():
  """Callers hold a ``Model``; only ``models/`` knows BERT, the decoders or T5 by module."""
  private = {"bert", "decoder", "decoder_variants", "t5", "t5_layers", "stack", "attention",
             "rotary"}
  found = []
  for path, tree in _package_modules():
    if path.startswith("latadj_jax/models/"):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == "latadj_jax.models":
        found += [(path, a.name) for a in node.names if a.name in private]
      elif isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
            a.name for a in node.names]
        found += [(path, n) for n in names
                  if n.startswith("latadj_jax.models.") and n.split(".")[2] in private]
  assert found == [], found
