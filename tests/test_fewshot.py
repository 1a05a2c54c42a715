"""Few-shot MMLU/BBH harness: local layouts, prompts, scoring, the eval.py CLI end to end (issue 6)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from latadj_jax.core import schedule
from latadj_jax.data import fewshot as fs
from latadj_jax.data import sources
from latadj_jax.runtime import config_lib
from latadj_jax.tasks import fewshot
from latadj_jax.tuning import profiles

REPO = Path(__file__).resolve().parents[1]

# Mimics lm-eval's mmlu_cot_prompts.json: per subject one CoT prompt string. It
# has the real file's quirks: options on one line or one per line, five
# options, "(A)" inside the reasoning, a question opening with a newline, and a
# block with no "The answer is (X)" (skipped).
MMLU = {
    "astronomy": textwrap.dedent("""\
        The following are multiple choice questions (with answers) about astronomy.

        Q: Where do most short-period comets come from?
        (A) The Kuiper belt (B) The asteroid belt (C) The Oort cloud (D) The Sun
        A: Let's think step by step. Not (C), which holds long-period comets. The answer is (A).

        Q: Why is Mars red?
        (A) Rust
        (B) Ice
        (C) Plants
        (D) Lava
        A: Let's think step by step. Iron oxide covers the surface. The answer is (A).

        Q: 
        How many moons has Mars?
        (A) 0 (B) 1 (C) 2 (D) 3 (E) 4
        A: Let's think step by step. Phobos and Deimos. The answer is (C).

        Q: Which planet is largest?
        (A) Earth (B) Jupiter (C) Mars (D) Venus
        A: Let's think step by step. Jupiter. The answer is (B).

        """),
    "virology": textwrap.dedent("""\

        The following are multiple choice questions (with answers) about virology.

        Q: What is a virion?
        (A) A cell (B) A virus particle (C) A protein (D) A gene
        A: Let's think step by step. The answer is (B).

        Q: Which virus causes flu?
        (A) HIV (B) Influenza (C) Measles (D) Rabies
        A: Let's think step by step. I am not sure.

        Q: Viruses replicate only in
        (A) soil (B) water (C) host cells (D) air
        A: Let's think step by step. They need a host. The answer is (C).

        """),
}

BBH_GROUP = """\
group: bbh_fewshot
task:
  - bbh_fewshot_boolean_expressions
  - bbh_fewshot_sports_understanding
metadata:
  version: 3.0
"""

BBH_TASK = """\
dataset_name: {name}
description: '{description}


  '
doc_to_text: 'Q: {{{{input}}}}

  A:'
fewshot_config:
  sampler: first_n
  samples:
{samples}
include: _fewshot_template_yaml
task: bbh_fewshot_{name}
"""

BBH = {
    "boolean_expressions": ("Evaluate the result of a random Boolean expression.",
                            [("not ( True ) is", "False"), ("True and True is", "True"),
                             ("not not ( False ) is", "False")]),
    "sports_understanding": ("Determine whether a sentence is plausible.",
                             [("Is the following sentence plausible? \"Messi scored a goal.\"", "yes"),
                              ("Is the following sentence plausible? \"Kobe hit a home run.\"", "no"),
                              ("Is the following sentence plausible? \"Brady threw a pass.\"", "yes")]),
}
# A BIG-Bench-Hard eval file for one task: these examples are scored 3-shot.
BBH_EVAL = {"sports_understanding": [("Is the following sentence plausible? \"Kane kicked a goal.\"",
                                      "yes"),
                                     ("Is the following sentence plausible? \"Curry hit a birdie.\"",
                                      "no")]}


def _samples_yaml(samples):
  return "\n".join(f"  - input: '{q}'\n    target: '{t}'" for q, t in samples)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  """Returns a directory in the layout of ../shared/data/fewshot (written here, small)."""
  root = tmp_path_factory.mktemp("fewshot")
  (root / fs.MMLU_FILE).write_text(json.dumps(MMLU, indent=1))
  bbh = root / "bbh"
  bbh.mkdir()
  (bbh / "_bbh_fewshot.yaml").write_text(BBH_GROUP)
  for name, (description, samples) in BBH.items():
    (bbh / f"{name}.yaml").write_text(BBH_TASK.format(name=name, description=description,
                                                      samples=_samples_yaml(samples)))
  for name, rows in BBH_EVAL.items():
    (bbh / f"{name}.json").write_text(json.dumps(
        {"canary": "x", "examples": [{"input": q, "target": t} for q, t in rows]}))
  return root


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory) -> Path:
  """Returns a tiny random T5 (v1.1 shape) with a Unigram tokenizer trained on the fixture text."""
  import transformers
  from flax import serialization
  from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
  )
  from tokenizers import models as tok_models

  from latadj_jax import models
  path = tmp_path_factory.mktemp("tiny_t5")
  tok = Tokenizer(tok_models.Unigram())
  tok.normalizer = normalizers.Replace(Regex(r"\s+"), " ")  # T5's SentencePiece drops newlines too
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  texts = list(MMLU.values()) + [p.read_text() for p in (data_dir / "bbh").iterdir()]
  tok.train_from_iterator(texts, trainers.UnigramTrainer(
      vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(str(path))
  hf_config = {"model_type": "t5", "vocab_size": len(fast), "d_model": 32, "d_kv": 8, "d_ff": 64,
               "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
               "tie_word_embeddings": False, "decoder_start_token_id": 0}
  (path / "config.json").write_text(json.dumps(hf_config))
  (path / "flax_model.msgpack").write_bytes(
      serialization.to_bytes(models.build(hf_config).init()))
  return path


def _config(name="flan_t5_mmlu", **values):
  config = config_lib.load(name)
  for k, v in values.items():
    config[k] = v
  return config


# --- local layouts ----------------------------------------------------------------------------

def test_parse_mmlu_cot_prompt_keeps_question_options_and_letter():
  subject, qs = fs.parse_mmlu_prompt(MMLU["astronomy"])
  assert subject == "astronomy" and len(qs) == 4
  assert qs[0] == fs.Example("Where do most short-period comets come from?", "A",
                             ("The Kuiper belt", "The asteroid belt", "The Oort cloud", "The Sun"))
  assert qs[1].choices == ("Rust", "Ice", "Plants", "Lava")          # one option per line
  assert qs[2].question == "How many moons has Mars?" and len(qs[2].choices) == 5
  assert qs[2].target == "C"
  subject, qs = fs.parse_mmlu_prompt(MMLU["virology"])
  assert subject == "virology" and [q.target for q in qs] == ["B", "C"]  # no answer: skipped


def test_mmlu_local_scores_each_question_against_its_subjects_others(data_dir):
  bench = fs.read_mmlu_local(data_dir / fs.MMLU_FILE, num_shots=5)
  assert len(bench.items) == 6 and bench.name == "mmlu"
  for it in bench.items:
    assert it.query not in it.shots
    assert all(s in [x.query for x in bench.items if x.task == it.task] for s in it.shots)
  assert [len(it.shots) for it in bench.items] == [3, 3, 3, 3, 1, 1]  # n - 1, never 5 here
  assert "at most 3" in bench.protocol and "1 unparsed skipped" in bench.protocol
  two = fs.read_mmlu_local(data_dir / fs.MMLU_FILE, num_shots=2, tasks=("virology",))
  assert [it.task for it in two.items] == ["virology"] * 2
  with pytest.raises(ValueError, match="unknown MMLU subject"):
    fs.read_mmlu_local(data_dir / fs.MMLU_FILE, 5, tasks=("astrology",))


def test_bbh_local_uses_yaml_exemplars_as_shots(data_dir):
  bench = fs.read_bbh_local(data_dir / "bbh", num_shots=3)
  by_task = {}
  for it in bench.items:
    by_task.setdefault(it.task, []).append(it)
  assert sorted(by_task) == ["boolean_expressions", "sports_understanding"]  # group file skipped
  exemplars = [fs.Example(q, t) for q, t in BBH["boolean_expressions"][1]]
  # No eval file: each exemplar is scored with the other two as shots.
  assert [it.query for it in by_task["boolean_expressions"]] == exemplars
  for it in by_task["boolean_expressions"]:
    assert len(it.shots) == 2 and it.query not in it.shots
  assert by_task["boolean_expressions"][0].header.startswith("Evaluate the result")
  # An eval file: its examples, with all three exemplars as shots.
  assert [(it.query.question, it.query.target) for it in by_task["sports_understanding"]] \
      == BBH_EVAL["sports_understanding"]
  assert all(len(it.shots) == 3 for it in by_task["sports_understanding"])
  assert "1 tasks with a <task>.json" in bench.protocol and "leave-one-out" in bench.protocol


# --- prompts and scoring ----------------------------------------------------------------------

def test_prompts_have_k_shots_with_answers_then_the_open_query(data_dir):
  it = fs.read_mmlu_local(data_dir / fs.MMLU_FILE, 5).items[3]
  assert fs.render(it, 1) == (
      "The following are multiple choice questions (with answers) about astronomy.\n\n"
      "Where do most short-period comets come from?\nA. The Kuiper belt\nB. The asteroid belt\n"
      "C. The Oort cloud\nD. The Sun\nAnswer: A\n\n"
      "Which planet is largest?\nA. Earth\nB. Jupiter\nC. Mars\nD. Venus\nAnswer:")
  assert fs.render(it, 3).count("Answer:") == 4 and fs.render(it, 0).count("Answer:") == 1
  b = fs.read_bbh_local(data_dir / "bbh", 3).items[0]
  assert fs.render(b, 2) == ("Evaluate the result of a random Boolean expression.\n\n"
                             "Q: True and True is\nA: True\n\n"
                             "Q: not not ( False ) is\nA: False\n\n"
                             "Q: not ( True ) is\nA:")


@pytest.mark.parametrize("text,is_choice,want", [
    ("C", True, "C"), (" (B)", True, "B"), ("( D )", True, "D"), ("A. Earth", True, "A"),
    ("B because", True, "B"), ("Cat", True, "Cat"), ("The answer is C", True, "The answer is C"),
    ("False", False, "False"), (" yes \n\nQ: more", False, "yes"), ("(A) Q: next", False, "(A)"),
])
def test_answer_extraction(text, is_choice, want):
  assert fs.extract_answer(text, is_choice) == want


def test_exact_match_scoring(data_dir):
  np.testing.assert_array_equal(fs.exact_match(["A", " yes", "No", "(A)"], ["A", "yes", "no", "A"]),
                                [1, 1, 0, 0])
  items = fs.read_mmlu_local(data_dir / fs.MMLU_FILE, 5).items
  gens = [it.query.target if i % 2 == 0 else "Z" for i, it in enumerate(items)]
  s = fewshot.exact_match_scores(items, gens)
  assert s["correct"] == 3 and s["score"] == 0.5 and s["num_items"] == 6
  assert s["per_task"] == {"astronomy": 0.5, "virology": 0.5}


def test_spread_takes_items_round_robin_over_tasks(data_dir):
  items = fs.read_mmlu_local(data_dir / fs.MMLU_FILE, 5).items
  assert [it.task for it in fs.spread(items, 3)] == ["astronomy", "virology", "astronomy"]
  assert len(fs.spread(items, 100)) == len(items)


def test_long_prompts_drop_shots_to_fit_the_longest_bucket(data_dir, model_dir):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  items = fs.read_mmlu_local(data_dir / fs.MMLU_FILE, 5).items
  full = [len(tok(fs.render(it, 3))["input_ids"]) for it in items[:4]]
  zero = [len(tok(fs.render(it, 0))["input_ids"]) for it in items[:4]]
  max_len = (min(full) + max(zero)) // 2
  p = fs.tokenize(items[:4], tok, max_len, num_shots=5)
  assert all(len(x) <= max_len for x in p.encoded.input_ids)
  assert all(n < 3 for n in p.shots_used) and p.num_truncated == 0
  cut = fs.tokenize(items[:1], tok, 4, num_shots=5)  # no room even at 0 shots: cut from the left
  assert cut.shots_used == [0] and cut.num_truncated == 1
  assert cut.encoded.input_ids[0][-1] == tok.eos_token_id


# --- clear errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,hub", [("flan_t5_mmlu", "cais/mmlu"), ("flan_t5_bbh", "lukaemon/bbh")])
def test_hub_offline_fails_fast_naming_data_dir(name, hub, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(sources.DataUnavailableError, match=f"{hub}.*--config.data_dir"):
    fs.load_benchmark(_config(name))


def test_missing_local_files_and_wrong_model_say_what_to_pass(tmp_path):
  with pytest.raises(sources.DataUnavailableError, match="no mmlu_cot_prompts.json.*data_dir"):
    fs.load_benchmark(_config(data_dir=str(tmp_path)))
  (tmp_path / "bbh").mkdir()
  with pytest.raises(sources.DataUnavailableError, match="no BBH task YAML"):
    fs.load_benchmark(_config("flan_t5_bbh", data_dir=str(tmp_path)))
  (tmp_path / "config.json").write_text(json.dumps({  # a complete BERT config: only the family is wrong
      "model_type": "bert", "vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}))
  with pytest.raises(ValueError, match="runs encoder-decoder models.*'bert'.*--config.model"):
    fewshot.load_t5(str(tmp_path))


def _eval_cli(*args):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, str(REPO / "eval.py"), *args], cwd=REPO, env=env,
                        capture_output=True, text=True)


@pytest.mark.slow
def test_eval_cli_needs_a_workdir_or_a_config():
  r = _eval_cli("--coeff", "0.9")
  assert r.returncode == 2 and "--workdir=DIR" in r.stderr and "--config=NAME" in r.stderr
  r = _eval_cli("--config=glue_sst2")
  assert r.returncode == 2 and "train.py --config=glue_sst2" in r.stderr


# --- end to end: the eval.py CLI with a tiny random T5 ----------------------------------------

def _check_rows(result, num_layers=2):
  k1, k08 = result["rows"]
  b = result["main_bucket"]
  assert (k1["coeff"], k08["coeff"]) == (1.0, 0.8)
  assert k1["keep_counts"] == [b] * num_layers  # flat profile, k = 1: no elimination
  assert k1["expected_speedup"] == 1.0 and k1["flops_ratio"] == 1.0
  assert k08["keep_counts"] == list(schedule.keep_counts(b, 0.8, [1.0] * num_layers))
  assert k08["expected_speedup"] > 1.0 and k08["flops_ratio"] > 1.0
  for r in (k1, k08):
    assert 0.0 <= r["score"] <= 1.0 and r["num_items"] == result["num_items"]
    assert r["encoder_ms"] > 0 and r["generate_ms"] > 0 and r["measured_speedup"] > 0


@pytest.mark.slow
def test_eval_cli_mmlu_end_to_end(data_dir, model_dir, tmp_path):
  out = tmp_path / "mmlu"
  r = _eval_cli("--config=flan_t5_mmlu", f"--config.model={model_dir}",
                f"--config.data_dir={data_dir}", "--config.max_len=128", "--config.buckets=(128,)",
                "--config.batch_size=4", "--coeff", "1.0,0.8", "--repeats", "1", "--out", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads((out / fewshot.RESULTS).read_text())
  assert result["benchmark"] == "mmlu" and result["num_items"] == 6
  assert "each evaluated once" in result["protocol"] and result["profile"] == [1.0, 1.0]
  _check_rows(result)
  preds = [json.loads(line) for line in (out / fewshot.PREDICTIONS).read_text().splitlines()]
  assert len(preds) == 6 and set(preds[0]["by_coeff"]) == {"1", "0.8"}
  assert "| 0.8 |" in r.stdout


@pytest.mark.slow
def test_eval_cli_bbh_end_to_end_into_config_workdir(data_dir, model_dir, tmp_path):
  r = _eval_cli("--config=flan_t5_bbh", f"--config.model={model_dir}",
                f"--config.data_dir={data_dir}", "--config.max_len=128", "--config.buckets=(128,)",
                "--config.batch_size=4", f"--config.workdir={tmp_path}", "--coeff", "1.0,0.8",
                "--repeats", "1")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads((tmp_path / fewshot.RESULTS).read_text())
  assert result["benchmark"] == "bbh" and result["num_items"] == 5  # 3 held out + 2 from the file
  assert result["max_new_tokens"] >= 2  # auto: the longest target, plus one
  _check_rows(result)


def test_measured_profile_from_acc_on_the_prompts(data_dir, model_dir):
  config = _config(data_dir=str(data_dir), max_len=128, buckets=(128,), batch_size=4)
  bench = fs.load_benchmark(config)
  pre, tok = fewshot.load_t5(str(model_dir))
  h = fewshot.build(config, bench, pre, tok)
  resolve = lambda spec: profiles.resolve(spec, h.model, h.params, lambda: h.acc_batches(1), 1)
  ep, prof = resolve("acc")
  assert len(ep) == 2 and all(0 < e <= 1 for e in ep) and prof is not None and prof.ep == ep
  assert resolve("flat") == ((1.0, 1.0), None)
  assert resolve("0.9,0.8")[0] == (0.9, 0.8)
  with pytest.raises(ValueError, match="flat, acc, .* or 2 comma-separated"):
    resolve("measured")
