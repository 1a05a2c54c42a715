"""models/checkpoints.py: checkpoint formats, and the errors users see when weights are missing
or wrong (issue 2)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import serialization

from latadj_jax import models
from latadj_jax.models import Batch, checkpoints

REPO = Path(__file__).resolve().parents[1]


def _logits(pre, ids):
  return np.asarray(pre.model.apply(pre.params, Batch(ids)).logits)


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


# --- corrupted weight files and incomplete configs (issue 18): one line naming the file and the fix

def _one_line_error(model_dir, match):
  """Returns the CheckpointError that loading ``model_dir`` raises, checked to be one line."""
  with pytest.raises(checkpoints.CheckpointError, match=match) as e:
    models.from_pretrained(str(model_dir))
  assert "\n" not in str(e.value), str(e.value)
  # No chained traceback ("During handling of the above exception...") under the message.
  assert e.value.__cause__ is None
  assert e.value.__context__ is None or e.value.__suppress_context__
  return e.value


def _dir_with(tiny_hf_bert, tmp_path, name, data):
  (tmp_path / "config.json").write_text((tiny_hf_bert[0] / "config.json").read_text())
  (tmp_path / name).write_bytes(data)
  return tmp_path


def _subdir(tmp_path, name="m"):
  (tmp_path / name).mkdir()
  return tmp_path / name


def _truncated(data: bytes) -> bytes:
  return data[: len(data) // 2]


GARBAGE = b"<html><body>502 Bad Gateway</body></html>" + bytes(range(256)) * 4


@pytest.mark.parametrize("damage", [_truncated, lambda d: GARBAGE, lambda d: b""],
                         ids=["truncated", "garbage", "empty"])
def test_corrupt_safetensors_is_one_line_error(tiny_hf_bert, tmp_path, damage):
  data = (tiny_hf_bert[0] / "model.safetensors").read_bytes()
  d = _dir_with(tiny_hf_bert, tmp_path, "model.safetensors", damage(data))
  err = _one_line_error(d, r"model\.safetensors is truncated or not a valid safetensors file "
                           r"\(SafetensorError: .*\); download it again")
  assert str(d / "model.safetensors") in str(err)


@pytest.mark.parametrize("damage", [_truncated, lambda d: GARBAGE, lambda d: b"\x01"],
                         ids=["truncated", "garbage", "not-a-dict"])
def test_corrupt_msgpack_is_one_line_error(tiny_hf_bert, tmp_path, damage):
  params = models.from_pretrained(str(tiny_hf_bert[0])).params
  data = serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
  d = _dir_with(tiny_hf_bert, tmp_path, "flax_model.msgpack", damage(data))
  err = _one_line_error(d, r"flax_model\.msgpack is truncated or not a valid Flax msgpack file "
                           r"\(.+\); download it again")
  assert str(d / "flax_model.msgpack") in str(err)


@pytest.mark.parametrize("damage", [_truncated, lambda d: GARBAGE, lambda d: b""],
                         ids=["truncated", "garbage", "empty"])
def test_corrupt_torch_bin_is_one_line_error(tiny_hf_bert, tmp_path, damage):
  path, hf = tiny_hf_bert
  torch.save(hf.state_dict(), tmp_path / "full.bin")
  d = _dir_with(tiny_hf_bert, _subdir(tmp_path), "pytorch_model.bin",
                damage((tmp_path / "full.bin").read_bytes()))
  err = _one_line_error(d, r"pytorch_model\.bin is truncated or not a valid PyTorch checkpoint "
                           r"file \(.+\); download it again")
  assert str(d / "pytorch_model.bin") in str(err)


def test_torch_bin_holding_no_state_dict_is_one_line_error(tiny_hf_bert, tmp_path):
  torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((tiny_hf_bert[0] / "config.json").read_text())
  _one_line_error(tmp_path, r"pytorch_model\.bin .*it holds a list, not a dict of tensors")


def test_shard_index_naming_a_missing_shard(tiny_hf_bert, tmp_path):
  (tmp_path / "config.json").write_text((tiny_hf_bert[0] / "config.json").read_text())
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}))
  _one_line_error(tmp_path, r"lists the shard model-00001-of-00002\.safetensors, which is missing")


@pytest.mark.parametrize("family,drop", [
    ("bert", ("hidden_size",)),
    ("bert", ("num_attention_heads", "intermediate_size")),
    ("gpt2", ("n_embd",)),
    ("t5", ("d_kv", "num_heads")),
])
def test_config_missing_family_fields_is_one_line_error(tiny_hf_bert, tmp_path, family, drop):
  import transformers
  cfg = {"bert": lambda: json.loads((tiny_hf_bert[0] / "config.json").read_text()),
         "gpt2": lambda: transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).to_dict(),
         "t5": lambda: transformers.T5Config(d_model=16, d_kv=8, num_heads=2).to_dict()}[family]()
  for field in drop:
    del cfg[field]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "model.safetensors").write_bytes((tiny_hf_bert[0] / "model.safetensors").read_bytes())
  err = _one_line_error(tmp_path, rf"config\.json lacks {', '.join(drop)}, which a {family} model "
                                  rf"needs.*restore config\.json from the original model")
  assert str(tmp_path / "config.json") in str(err)


@pytest.mark.parametrize("text,match", [
    ('{"model_type": "bert", "hidden_size": 3', r"config\.json is not valid JSON \(JSONDecodeError"),
    ('["bert"]', r"config\.json holds a JSON list, not an object"),
    ('{"hidden_size": 32}', r"config\.json has no model_type.*\"model_type\": \"bert\""),
])
def test_unreadable_config_is_one_line_error(tmp_path, text, match):
  (tmp_path / "config.json").write_text(text)
  _one_line_error(tmp_path, match)


@pytest.mark.slow
def test_cli_prints_one_line_for_a_truncated_checkpoint(tiny_model_dir, tmp_path):
  # What a user sees: train.py given a truncated model.safetensors prints the error, no traceback.
  d = _subdir(tmp_path)
  for f in tiny_model_dir.iterdir():
    data = f.read_bytes()
    (d / f.name).write_bytes(_truncated(data) if f.name == "model.safetensors" else data)
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  env.pop("LATADJ_DEBUG", None)
  proc = subprocess.run(
      [sys.executable, str(REPO / "train.py"), "--config=quickstart", f"--config.model={d}",
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert f"{d / 'model.safetensors'} is truncated" in errors[0], errors[0]
