"""Checkpoint formats and the errors users see when weights are missing or wrong (issue 2)."""

import json
import time

import jax
import numpy as np
import pytest
import torch
from flax import serialization

from latadj_jax import checkpoints, models


def _logits(pre, ids):
  return np.asarray(pre.module.apply({"params": pre.params}, ids)["logits"])


def test_all_three_formats_load_the_same_weights(tiny_hf_bert, tmp_path):
  path, hf = tiny_hf_bert
  ids = np.array([[2, 7, 9, 11, 3]], np.int32)
  ref = models.from_pretrained(str(path))                  # model.safetensors
  bin_dir = tmp_path / "bin"
  hf.save_pretrained(bin_dir, safe_serialization=False)    # pytorch_model.bin
  from_bin = models.from_pretrained(str(bin_dir))
  assert checkpoints.read_weights(bin_dir)[1] == "torch"
  msg_dir = tmp_path / "msgpack"                           # flax_model.msgpack, HF Flax names
  msg_dir.mkdir()
  (msg_dir / "config.json").write_text((path / "config.json").read_text())
  (msg_dir / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(jax.tree.map(np.asarray, ref.params)))
  from_msgpack = models.from_pretrained(str(msg_dir))
  assert from_msgpack.report.missing == []
  np.testing.assert_array_equal(_logits(from_bin, ids), _logits(ref, ids))
  np.testing.assert_array_equal(_logits(from_msgpack, ids), _logits(ref, ids))


def test_body_only_checkpoint_loads_into_a_classifier(minilm_dir):
  # MiniLM is a BertModel (no "bert." prefix, no head): the body loads, the head stays at init.
  pre = models.from_pretrained(str(minilm_dir), num_labels=2)
  assert pre.report.missing == ["classifier/bias", "classifier/kernel"]
  assert len(pre.report.loaded) > 90


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="does not exist.*--config.model=DIR"):
    models.from_pretrained(str(tmp_path / "nope"))


def test_no_weight_file_lists_what_was_looked_for(tiny_hf_bert, tmp_path):
  (tmp_path / "config.json").write_text((tiny_hf_bert[0] / "config.json").read_text())
  with pytest.raises(checkpoints.CheckpointError) as e:
    models.from_pretrained(str(tmp_path))
  for name in ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin"):
    assert name in str(e.value)


def test_shape_mismatch_names_parameter_and_shapes(tiny_hf_bert, tmp_path):
  path, hf = tiny_hf_bert
  cfg = json.loads((path / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"intermediate/dense/kernel.*checkpoint \(32, 64\), model \(32, 48\)"):
    models.from_pretrained(str(tmp_path))


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "reformer"}))
  with pytest.raises(checkpoints.CheckpointError, match="unsupported model_type 'reformer'.*bert"):
    models.from_pretrained(str(tmp_path))


def test_unreachable_hub_fails_fast_with_guidance(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.time()
  with pytest.raises(checkpoints.CheckpointError, match="--config.model=DIR"):
    checkpoints.resolve_model_dir("some-org/some-model-that-is-not-cached")
  assert time.time() - start < 30
