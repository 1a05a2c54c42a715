"""tasks/continuation.py: continuation NLL of a causal LM under elimination (issues 16, 24).

Windows cut from a token stream, the NLL and top-1 of the continuation equal
one full forward over prompt + continuation, the k sweep and the ACC profile,
survivor-rule names, and ``eval.py --config=smollm2_text`` end to end on a
tiny Llama.
"""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from decoder_fixtures import N_LAYER, TINY_VOCAB, hf_llama, tiny
from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.models import Batch
from latadj_jax.tasks import continuation
from latadj_jax.tuning import profiles, sweep

REPO = Path(__file__).resolve().parents[1]


def test_windows_cut_the_token_stream():
  tok = text.byte_tokenizer()
  cont = continuation.windows(["abcdefghij" * 3, "0123456789"], tok, 6, 3)
  assert cont.prompts.shape == (4, 6) and cont.targets.shape == (4, 3)
  assert tok.decode(np.concatenate([cont.prompts[0], cont.targets[0]])) == "abcdefghi"
  assert tok.decode(np.concatenate([cont.prompts[1], cont.targets[1]])) == "012345678"  # round-robin
  with pytest.raises(ValueError, match="prompt_len"):
    continuation.windows(["short"], tok, 6, 3)


def _full_forward_nll(model, params, stream, P):
  """Returns (NLL [E, T], argmax [E, T]) of the continuation from one forward over prompt + continuation."""
  logits = np.asarray(model.apply(params, Batch(stream)).logits)[:, P - 1:-1]
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return -np.take_along_axis(logp, stream[:, P:, None], -1)[..., 0], logits.argmax(-1)


def test_continuation_nll_gpt2_matches_a_full_forward():
  model, params = tiny("gpt2")
  stream = np.random.default_rng(6).integers(0, TINY_VOCAB, (3, 17)).astype(np.int32)
  cont = continuation.Continuations(stream[:, :12], stream[:, 12:])
  scores, argmax = continuation.scores(model, params, cont, None, batch_size=2)
  nll, ref_argmax = _full_forward_nll(model, params, stream, 12)
  np.testing.assert_allclose(scores["nll"], nll.mean(), rtol=1e-5)
  np.testing.assert_array_equal(argmax, ref_argmax)
  assert scores["tokens"] == 15


@pytest.mark.slow
def test_continuation_sweep_llama():
  model, params = tiny("llama")
  stream = np.random.default_rng(6).integers(0, TINY_VOCAB, (5, 17)).astype(np.int32)
  cont = continuation.Continuations(stream[:, :12], stream[:, 12:])
  ev = continuation.ContinuationEval(model, params, cont, batch_size=2)
  rows = sweep.sweep(ev, sweep.plans([1.0, 0.7], schedule.flat_profile(N_LAYER)), repeats=1)
  nll, argmax = _full_forward_nll(model, params, stream, 12)
  np.testing.assert_allclose(rows[0]["nll"], nll.mean(), rtol=1e-5)
  assert rows[0]["top1_accuracy"] == (argmax == stream[:, 12:]).mean()
  assert rows[0]["agreement_with_k1"] == 1.0 and rows[0]["tokens"] == 25
  assert rows[1]["keep_counts"] == [8, 5, 3] and rows[1]["expected_speedup"] > 1.5
  assert 0 <= rows[1]["agreement_with_k1"] < 1 and rows[1]["nll"] != rows[0]["nll"]
  assert rows[1]["flops_ratio"] > 1.2
  resolve = lambda spec: profiles.resolve(spec, model, params, lambda: ev.acc_batches(2), 2)
  ep, prof = resolve("acc")
  assert len(ep) == N_LAYER and all(0 < v <= 1 for v in ep) and len(prof.acc) == N_LAYER
  assert resolve("flat") == ((1.0,) * N_LAYER, None)


def test_rule_names_parse_to_config_fields():
  assert continuation.rule_overrides("window8_s32_r64_p7") == dict(
      survivors="window", score_window=8, keep_sinks=32, keep_recent=64, score_pool=7)
  assert continuation.rule_overrides("last_s4") == dict(survivors="last", keep_sinks=4)
  with pytest.raises(ValueError, match="_p<pool>"):
    continuation.rule_overrides("window8_q3")


@pytest.mark.slow
def test_eval_cli_continuation_config(tmp_path):
  """``eval.py --config=smollm2_text`` end to end, on a tiny Llama directory with a byte tokenizer."""
  model_dir = tmp_path / "model"
  hf_llama("llama_gqa_untied", model_dir)
  text.byte_tokenizer().save_pretrained(model_dir)
  data = tmp_path / "text"
  data.mkdir()
  for name in ("a.txt", "b.txt"):
    (data / name).write_text("".join(f"line {i} of {name}, fair is foul\n" for i in range(60)))
  spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
  eval_cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(eval_cli)
  rc = eval_cli.main(["--config=smollm2_text", f"--config.model={model_dir}",
                      f"--config.data_dir={data}", "--config.prompt_len=24",
                      "--config.continuation_len=4", "--config.max_examples=3",
                      "--config.batch_size=2", "--coeff", "1.0,0.8", "--repeats", "1",
                      "--out", str(tmp_path / "out")])
  assert rc == 0
  result = json.loads((tmp_path / "out" / "continuation_results.json").read_text())
  assert [r["coeff"] for r in result["rows"]] == [1.0, 0.8] and result["examples"] == 3
  assert result["rows"][1]["keep_counts"] == [19, 15, 12]
