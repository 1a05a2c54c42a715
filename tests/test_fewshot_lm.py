"""Few-shot MMLU with a causal LM (issue 16): letters from next-token logits after an eliminated prefill."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from test_fewshot import MMLU

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import fewshot as fs
from latadj_jax.data import sources, text
from latadj_jax.runtime import config_lib
from latadj_jax.tasks import fewshot_lm
from latadj_jax.tuning import commands

REPO = Path(__file__).resolve().parents[1]
N_LAYER = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Returns (data dir, tiny random HF Llama directory with a byte tokenizer, torch model)."""
  root = tmp_path_factory.mktemp("fewshot_lm")
  (root / fs.MMLU_FILE).write_text(json.dumps(MMLU))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=N_LAYER, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512,
                                 initializer_range=0.2, bos_token_id=None, eos_token_id=None)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model_dir = root / "model"
  model.save_pretrained(model_dir)
  text.byte_tokenizer().save_pretrained(model_dir)
  return root, model_dir, model


def _config(**values):
  config = config_lib.load("smollm2_mmlu")
  for k, v in values.items():
    config[k] = v
  return config


def test_answer_letters_follow_a_shared_prefix():
  prefix, ids = fewshot_lm.answer_tokens(text.byte_tokenizer(), 5)
  assert prefix == [ord(" ")] and list(ids) == [ord(c) for c in "ABCDE"]  # bytes: " ", then a letter


def test_no_data_dir_fails_before_the_model_loads():
  with pytest.raises(sources.DataUnavailableError, match="--config.data_dir"):
    commands.run_harness(_config(model="/nonexistent"), fewshot_lm, [1.0])


def test_mmlu_sweep_matches_hf_next_token_letters(setup, tmp_path):
  """At k = 1 each answer is HF's argmax letter on the unpadded prompt; k = 0.8 eliminates."""
  data_dir, model_dir, model = setup
  result = commands.run_harness(
      _config(model=str(model_dir), data_dir=str(data_dir), max_len=256, buckets=(128, 256),
              batch_size=4), fewshot_lm, [1.0, 0.8], out=str(tmp_path), time_repeats=1)
  k1, k08 = result["rows"]
  assert result["num_items"] == 6 and result["profile"] == [1.0] * N_LAYER
  b = result["main_bucket"]
  assert k1["keep_counts"] == [b] * N_LAYER and k1["flops_ratio"] == 1.0
  assert k08["keep_counts"] == list(schedule.keep_counts(b, 0.8, [1.0] * N_LAYER))
  assert k08["expected_speedup"] > 1 and k08["flops_ratio"] > 1 and k08["measured_speedup"] > 0
  preds = [json.loads(line) for line in (tmp_path / "fewshot_predictions.jsonl").read_text().splitlines()]
  assert len({p["prompt_tokens"] for p in preds}) > 2  # rows of one batch are padded
  bench = fs.load_benchmark(_config(data_dir=str(data_dir)))
  tok = text.byte_tokenizer()
  want, greedy = [], []
  for item, p in zip(bench.items, preds):
    ids = tok(fs.render(item, p["shots"]))["input_ids"] + [ord(" ")]
    assert len(ids) == p["prompt_tokens"]
    with torch.no_grad():
      logits = model(torch.tensor([ids])).logits[0, -1].numpy()
    want.append(fs.LETTERS[int(logits[[ord(c) for c in fs.LETTERS[:len(item.query.choices)]]].argmax())])
    greedy.append(tok.decode([int(logits.argmax())]))
  assert [p["by_coeff"]["1"]["answer"] for p in preds] == want
  assert [p["by_coeff"]["1"]["greedy"] for p in preds] == greedy
  targets = [it.query.target for it in bench.items]
  assert k1["correct"] == sum(w == t for w, t in zip(want, targets))


def test_a_classifier_directory_is_refused_and_any_decoder_is_taken(tmp_path):
  transformers.BertForSequenceClassification(transformers.BertConfig(
      vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=16, max_position_embeddings=16)).save_pretrained(tmp_path / "bert")
  with pytest.raises(ValueError, match="runs causal LMs.*'bert' model, a classifier"):
    fewshot_lm.load_causal(str(tmp_path / "bert"))
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16)).save_pretrained(tmp_path / "gpt2")
  assert models.from_pretrained(str(tmp_path / "gpt2"), kind="causal_lm").model.kind == "causal_lm"
