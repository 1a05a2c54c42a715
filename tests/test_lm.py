"""Causal LM training and evaluation with elimination: survivor loss, resume, perplexity, last word, CLI (issue 5)."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latadj_jax import models as latadj_models
from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.runtime import config_lib
from latadj_jax.tasks import lm_eval
from latadj_jax.training import lm
from latadj_jax.tuning import sweep

REPO = Path(__file__).resolve().parents[1]
LINES = ["When shall we three meet again, in thunder, lightning, or in rain?",
         "Fair is foul, and foul is fair: hover through the fog and filthy air.",
         "So foul and fair a day I have not seen.",
         "Is this a dagger which I see before me, the handle toward my hand?",
         "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day."]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
  """Returns a directory of two small .txt files (about 2.7 KB each)."""
  path = tmp_path_factory.mktemp("text")
  rng = np.random.default_rng(0)
  for name in ("a.txt", "b.txt"):
    (path / name).write_text("\n".join(LINES[i] for i in rng.integers(0, len(LINES), 40)) + "\n")
  return path


@pytest.fixture(scope="module")
def lambada_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("lambada") / "passages.jsonl"
  path.write_text("\n".join(json.dumps({"text": line}) for line in LINES) + "\n")
  return path


def tiny_lm_config(data_dir, **overrides):
  """Returns the lm_text config shrunk to a 2-layer, 32-wide model on 32-token blocks: seconds on a CPU."""
  config = config_lib.load("lm_text")
  values = dict(data_dir=str(data_dir), block_size=32, max_len=32, buckets=(16, 32),
                batch_size=8, eval_batch_size=8, max_train_examples=48, max_eval_examples=12,
                num_epochs=1, learning_rate=3e-3, profile="acc", profile_batches=1, coeff=0.8,
                log_every=2, checkpoint_every=2, eval_coeffs=(), time_repeats=1, progress=False)
  values.update(overrides)
  for k, v in values.items():
    config[k] = v
  config.gpt2.update(n_layer=2, n_embd=32, n_head=2, n_positions=64)
  return config


def _params(workdir):
  return lm_eval.restore(workdir).params


@pytest.fixture(scope="module")
def trained(text_dir, tmp_path_factory):
  """Returns (workdir, metrics) of an uninterrupted tiny run: 6 steps through ``lm.train_and_evaluate``."""
  workdir = tmp_path_factory.mktemp("lmrun")
  return workdir, lm.train_and_evaluate(tiny_lm_config(text_dir), workdir)


# --- data -------------------------------------------------------------------------------------
def test_blocks_shift_by_one_and_cover_every_target_once():
  stream = np.arange(1, 12, dtype=np.int32)  # 11 tokens: 10 targets
  blocks = text.make_blocks(stream, 4)
  assert [b.tolist() for b in blocks.input_ids] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
  assert [t.tolist() for t in blocks.targets] == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
  assert blocks.num_targets == 10
  batch = next(text.lm_batches(blocks, 4, shuffle=False))
  assert batch["targets"][2].tolist() == [10, 11, 0, 0]
  assert batch["target_weights"][2].tolist() == [1, 1, 0, 0] and batch["weights"][3] == 0


def test_byte_tokenizer_round_trips_and_local_split(text_dir, tmp_path):
  tok = text.byte_tokenizer()
  s = "Fair is foul, ’é\n"
  assert tok(s)["input_ids"] == list(s.encode()) and tok.decode(tok(s)["input_ids"]) == s
  tok.save_pretrained(tmp_path / "tok")
  import transformers
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert again(s + text.EOS)["input_ids"] == list(s.encode()) + [256] and len(again) == 257
  train_docs = text.read_local(str(text_dir), "train", 0.1)
  dev_docs = text.read_local(str(text_dir), "validation", 0.1)
  for doc, tr, dev in zip(sorted(text_dir.glob("*.txt")), train_docs, dev_docs):
    assert tr + dev == doc.read_text() and dev.count("\n") == 4
  stream = text.tokenize_stream(train_docs, tok)
  assert (stream == 256).sum() == 1  # one EOS between the two files


# --- the loss ---------------------------------------------------------------------------------
def test_survivor_nll_scores_only_survivors_with_targets():
  V = 7
  logits_BxKxV = jax.random.normal(jax.random.PRNGKey(0), (1, 3, V))
  positions_BxK = jnp.asarray([[1, 3, 5]])
  mask_BxK = jnp.asarray([[True, True, False]])       # position 5 is a pad
  targets_BxN = jnp.asarray([[0, 4, 0, 6, 0, 2]])
  weights_BxN = jnp.asarray([[1, 1, 1, 0, 1, 1]], jnp.float32)  # position 3 has no target
  nll_BxK, w_BxK = lm_eval.survivor_nll(logits_BxKxV, positions_BxK, mask_BxK, targets_BxN, weights_BxN)
  np.testing.assert_array_equal(np.asarray(w_BxK), [[1, 0, 0]])
  expected = -jax.nn.log_softmax(logits_BxKxV[0, 0])[4]
  np.testing.assert_allclose(np.asarray(nll_BxK), [[expected, 0, 0]], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
  """Returns (model, params) of a tiny random GPT-2 (dropout 0.1, as GPT-2's default)."""
  model = latadj_models.build({"model_type": "gpt2", "vocab_size": 50, "n_positions": 64,
                               "n_embd": 16, "n_layer": 2, "n_head": 2, "initializer_range": 0.3})
  return model, model.init()


def _plain_logits(model, params, rows, n):
  """Returns the no-elimination logits of ragged token rows, right-padded to ``n`` (one compile)."""
  ids = np.zeros((len(rows), n), np.int32)
  mask = np.zeros((len(rows), n), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return np.asarray(_forward(model)(params, ids, mask))


@functools.lru_cache(maxsize=4)
def _forward(model):
  return jax.jit(lambda p, i, m: model.apply(p, latadj_models.Batch(i, m)).logits)


def test_loss_is_on_survivors_only(tiny_model):
  model, params = tiny_model
  N, counts = 12, (8, 5)
  rng = np.random.default_rng(1)
  stream = rng.integers(0, 50, 2 * N + 1).astype(np.int32)
  batch = next(text.lm_batches(text.make_blocks(stream, N), 2, shuffle=False))
  out = jax.jit(lambda p, i, m: model.apply(p, latadj_models.Batch(i, m), counts))(
      params, batch["input_ids"], batch["attention_mask"])
  survivors = np.asarray(out.positions)
  jitted = jax.jit(lambda p, b: lm.loss_sums(p, b, None, model=model, keep_counts=counts,
                                             deterministic=True))
  loss = lambda b: jitted(params, {k: b[k] for k in lm.BATCH_KEYS})
  total, count = loss(batch)
  assert int(count) == 2 * counts[-1]
  # Computed by hand: survivor at p scored against the token after p.
  logp = jax.nn.log_softmax(out.logits, axis=-1)
  by_hand = -sum(float(logp[b, j, batch["targets"][b, p]])
                 for b in range(2) for j, p in enumerate(survivors[b]))
  np.testing.assert_allclose(float(total), by_hand, rtol=1e-5)
  gone = sorted(set(range(N)) - set(survivors[0].tolist()))
  changed = {**batch, "targets": batch["targets"].copy()}
  changed["targets"][0, gone] = (changed["targets"][0, gone] + 1) % 50
  np.testing.assert_array_equal(np.asarray(loss(changed)[0]), np.asarray(total))
  changed["targets"][0, survivors[0][0]] = (changed["targets"][0, survivors[0][0]] + 1) % 50
  assert float(loss(changed)[0]) != float(total)


# --- training ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_run_writes_what_eval_needs(trained):
  workdir, metrics = trained
  assert metrics["perplexity"] > 1 and 0 < metrics["fraction_scored"] < 1
  for name in ("config.json", "model_config.json", "profile.json", "profile.png",
               "metrics.jsonl", "tokenizer/tokenizer.json"):
    assert (workdir / name).exists(), name
  profile = json.loads((workdir / "profile.json").read_text())
  assert len(profile["acc"]) == len(profile["ep"]) == 2 and set(profile["schedules"]) == {"32"}
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [l["loss"] for l in lines if "loss" in l]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
  assert any("eval_perplexity" in l for l in lines)


@pytest.mark.slow
def test_lm_resume_after_kill_matches_uninterrupted(trained, text_dir, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "killed"
  real_step, calls = lm.compiled_step, {"n": 0}

  def dying_step(*args, **kwargs):
    fn = real_step(*args, **kwargs)

    def step(*a):
      calls["n"] += 1
      if calls["n"] == 4:  # after the step-2 checkpoint, before step 4's
        raise KeyboardInterrupt("simulated kill")
      return fn(*a)
    return step

  monkeypatch.setattr(lm, "compiled_step", dying_step)
  with pytest.raises(KeyboardInterrupt):
    lm.train_and_evaluate(tiny_lm_config(text_dir), workdir)
  monkeypatch.setattr(lm, "compiled_step", real_step)
  lm.train_and_evaluate(tiny_lm_config(text_dir), workdir)
  assert "resumed from step 2" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(_params(trained[0])), jax.tree.leaves(_params(workdir))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_anytime_lm_terms_distill_at_each_students_survivors(tiny_model):
  """The teacher term is the plain model's survivor NLL; a student's is T^2 KL at its survivors only."""
  from latadj_jax.training import anytime
  model, params = tiny_model
  model = model.with_dropout(0.0)
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 50, (2, 12)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "targets": np.roll(ids, -1, axis=1), "target_weights": np.ones((2, 12), np.float32)}
  batch["target_weights"][:, -1] = 0
  spec = anytime.AnytimeSpec((0.5, 0.8, 1.0), num_sampled=1, teacher="full")
  schedules = {k: schedule.keep_counts(12, k, (1.0, 1.0)) for k in spec.coeffs}
  terms = lm.anytime_loss_sums(params, batch, jax.random.PRNGKey(0), model=model, spec=spec,
                               schedules=schedules, sampled=(0.8,))
  assert set(terms) == {"label", "smallest", "sampled0"}
  total, count = lm.loss_sums(params, batch, None, model=model, keep_counts=None,
                              deterministic=True)
  np.testing.assert_allclose(np.asarray(terms["label"][0]), np.asarray(total), rtol=1e-6)
  assert float(terms["label"][1]) == float(count) == 22
  # The smallest student by hand: KL(teacher || student) at each of its scored survivors.
  full = model.apply(params, latadj_models.Batch(ids)).logits
  out = model.apply(params, latadj_models.Batch(ids), schedules[0.5])
  pos = np.asarray(out.positions)
  teacher = jax.nn.log_softmax(np.take_along_axis(np.asarray(full), pos[..., None], 1))
  student = jax.nn.log_softmax(out.logits)
  kl = np.asarray(jnp.sum(jnp.exp(teacher) * (teacher - student), -1))
  w = pos < 11  # the last position has no target
  np.testing.assert_allclose(float(terms["smallest"][0]), float((kl * w).sum()), rtol=1e-5,
                             atol=1e-7)
  assert float(terms["smallest"][1]) == w.sum() and w.sum() < 22


@pytest.mark.slow
def test_anytime_lm_run_compiles_one_step_per_draw(text_dir, tmp_path, monkeypatch):
  built = []
  real = lm.make_anytime_step

  def spy(*args, **kwargs):
    step = real(*args, **kwargs)
    built.append(step)
    return step

  monkeypatch.setattr(lm, "make_anytime_step", spy)
  config = tiny_lm_config(text_dir, train_coeffs="0.6,0.8,0.9,1.0", anytime_samples=1,
                          teacher="full", profile="flat", max_train_examples=64, checkpoint_every=100)
  lm.train_and_evaluate(config, tmp_path / "any")
  lines = [json.loads(l) for l in (tmp_path / "any" / "metrics.jsonl").read_text().splitlines()]
  logged = [l for l in lines if "loss" in l]
  assert logged and all({"loss_label", "loss_smallest", "loss_sampled0"} <= set(l) for l in logged)
  (step,) = built
  assert 1 <= len(step.compiled) <= 3 and all(len(k[1]) == 1 for k in step.compiled)
  with pytest.raises(ValueError, match="teacher=full"):
    lm.train_and_evaluate(tiny_lm_config(text_dir, train_coeffs="0.6,1.0", teacher="largest"),
                          tmp_path / "bad")


# --- evaluation -------------------------------------------------------------------------------
def test_perplexity_at_k1_is_the_plain_models(tiny_model):
  model, params = tiny_model
  stream = np.random.default_rng(2).integers(0, 50, 3 * 16 + 7).astype(np.int32)
  blocks = text.make_blocks(stream, 16)  # the last block is short: padding must not count
  ev = lm_eval.LMEvaluator(model, params, blocks, 2, "tiny")
  got = ev.perplexity(schedule.keep_counts(16, 1.0, schedule.flat_profile(2)))
  nll, n = 0.0, 0
  for batch in text.lm_batches(blocks, 2, shuffle=False):
    logits = _plain_logits(model, params, [r[m > 0] for r, m in
                                            zip(batch["input_ids"], batch["attention_mask"])], 16)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    nll += float(jnp.sum(ce * batch["target_weights"]))
    n += int(batch["target_weights"].sum())
  assert n == len(stream) - 1 and got["tokens"] == n and got["fraction_scored"] == 1.0
  np.testing.assert_allclose(got["perplexity"], math.exp(nll / n), rtol=1e-5)
  cut = ev.perplexity(schedule.keep_counts(16, 0.7, schedule.flat_profile(2)))
  assert cut["fraction_scored"] < 0.6 and cut["perplexity"] != got["perplexity"]


def _word_tokenizer(words):
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, "[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_last_word_accuracy_on_a_fixture_with_known_answers(tiny_model):
  # One token per word: half the passages end in the model's own greedy word, half in another.
  model, params = tiny_model
  words = [f"w{i}" for i in range(49)]
  tok = _word_tokenizer(words)
  rng = np.random.default_rng(3)
  contexts = [[words[j] for j in rng.integers(0, 49, rng.integers(3, 20))] for _ in range(16)]
  rows = [tok(" ".join(ctx))["input_ids"] for ctx in contexts]
  logits = _plain_logits(model, params, rows, 32)
  passages = []
  for ctx, row, lg in zip(contexts, rows, logits):
    greedy = int(np.argmax(lg[len(row) - 1]))
    if greedy == 0 or len(passages) == 8:
      continue  # [UNK] is no word to end a passage with
    last = greedy if len(passages) % 2 == 0 else greedy % 49 + 1  # ids 1..49 are the words
    passages.append(" ".join(ctx + [tok.convert_ids_to_tokens(last)]))
  assert len(passages) == 8
  lw = text.encode_last_word(passages, tok, 32)
  assert all(len(t) == 1 for t in lw.targets)
  flat = schedule.flat_profile(2)
  got = lm_eval.last_word_scores(model, params, lw, sweep.Schedules({}, 1.0, flat), 4, (32,))
  assert got["accuracy"] == 0.5 and got["examples"] == 8
  cut = lm_eval.last_word_scores(model, params, lw, sweep.Schedules({}, 0.6, flat), 4, (32,))
  assert 0 <= cut["accuracy"] <= 1 and math.isfinite(cut["perplexity"])


def test_last_word_multi_token_nll_matches_full_forward(tiny_model, lambada_file):
  # Byte-level: every last word is several tokens, scored through the KV cache.
  model, params = tiny_model
  tok = text.byte_tokenizer()
  lw = text.encode_last_word(text.read_jsonl_texts(lambada_file), tok, 40)
  lw = text.LastWord([c % 50 for c in lw.contexts], [t % 50 for t in lw.targets])
  got = lm_eval.last_word_scores(model, params, lw, sweep.Schedules({}, 1.0, schedule.flat_profile(2)),
                                3, (40,))
  word_nll, correct = [], 0
  full = _plain_logits(model, params, [np.concatenate([c, t[:-1]]) for c, t in
                                        zip(lw.contexts, lw.targets)], 56)
  for ctx, tgt, lg in zip(lw.contexts, lw.targets, full):
    logits = lg[len(ctx) - 1:len(ctx) - 1 + len(tgt)]
    word_nll.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, tgt).sum()))
    correct += bool((jnp.argmax(logits, -1) == tgt).all())
  assert got["accuracy"] == correct / len(lw)
  np.testing.assert_allclose(got["perplexity"], math.exp(np.mean(word_nll)), rtol=1e-5)


@pytest.mark.slow
def test_eval_cli_on_an_lm_workdir(trained, lambada_file):
  workdir = trained[0]
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, "eval.py", "--workdir", str(workdir), "--coeff", "0.8,1.0",
                         "--profile", "flat", "--repeats", "1", "--lambada", str(lambada_file)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| coeff | perplexity | fraction scored | lambada accuracy |" in proc.stdout
  rows = json.loads((workdir / "eval_results.json").read_text())["rows"]
  assert [r["coeff"] for r in rows] == [0.8, 1.0]
  assert rows[1]["fraction_scored"] == 1.0 > rows[0]["fraction_scored"]
  assert rows[0]["expected_speedup"] > rows[1]["expected_speedup"] == 1.0
  assert all(r["lambada_examples"] == len(LINES) for r in rows)
  bad = subprocess.run([sys.executable, "eval.py", "--workdir", str(workdir), "--speedup", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "--coeff" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_generate_ttft_cli_on_an_lm_workdir(trained, tmp_path, capsys):
  sys.path.insert(0, str(REPO / "benchmarks"))
  import generate_ttft
  out = tmp_path / "ttft.json"
  generate_ttft.main(["--workdir", str(trained[0]), "--coeff", "0.8,1.0", "--profile", "flat",
                      "--new_tokens", "4", "--repeats", "1", "--out", str(out)])
  assert "| k | keep counts |" in capsys.readouterr().out
  rows = json.loads(out.read_text())["rows"]
  assert [r["coeff"] for r in rows] == [0.8, 1.0]
  assert rows[0]["keep_counts"] == [25, 20] and rows[1]["keep_counts"] == [32, 32]
  # Layer l's cache holds the N_{l-1} prompt vectors it attended over, plus the new tokens.
  assert rows[0]["cache_sizes"] == [32 + 4, 25 + 4] and rows[1]["cache_sizes"] == [36, 36]
  assert all(r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
