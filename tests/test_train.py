"""The training loop end to end on a tiny random BERT: checkpoints, resume, data parallelism (issue 3).

Also train.py's one-line errors. Every test here trains or starts a process: the whole
module is slow.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from latadj_jax.runtime import workdir as wd
from latadj_jax.training import classifier

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _params(workdir):
  from latadj_jax.tuning import offline
  return offline.restore(workdir)


@pytest.fixture(scope="module")
def trained(tiny_classifier_run):
  """Returns (workdir, metrics) of an uninterrupted tiny run (2 epochs, 2 buckets), read only."""
  return tiny_classifier_run


def test_run_writes_everything_eval_needs(trained):
  workdir, metrics = trained
  assert 0.0 <= metrics["accuracy"] <= 1.0
  for name in ("config.json", "model_config.json", "profile.json", "profile.png",
               "metrics.jsonl", "tokenizer/tokenizer.json"):
    assert (workdir / name).exists(), name
  profile = json.loads((workdir / "profile.json").read_text())
  assert len(profile["acc"]) == len(profile["fit"]) == len(profile["ep"]) == 3
  assert set(profile["schedules"]) == {"16", "32"}
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("loss" in l for l in lines) and any("eval_accuracy" in l for l in lines)


def test_quickstart_smoke_real_minilm(tmp_path, capsys):
  # The README's first run, shortened as notebook 02 shortens it (40 steps of 16 at a higher
  # lr, one 32-token bucket): real MiniLM weights, the shipped data.
  from latadj_jax.runtime import config_lib
  config = config_lib.override(config_lib.load("quickstart"), [
      "max_steps=40", "learning_rate=2e-4", "max_len=32", "buckets=(32,)",
      "eval_coeffs=(0.8,1.0)", "time_repeats=2", "progress=false"])
  metrics = classifier.train_and_evaluate(config, tmp_path)
  out = capsys.readouterr().out
  assert "| coeff | accuracy |" in out and "executable cache:" in out
  assert metrics["accuracy"] >= 0.7  # chance is 0.5; a full quickstart run reaches ~0.88
  rows = json.loads((tmp_path / "eval_results.json").read_text())["rows"]
  assert [r["coeff"] for r in rows] == [0.8, 1.0]
  assert rows[0]["expected_speedup"] > rows[1]["expected_speedup"] > 1.0
  assert (tmp_path / "eval_sweep.png").stat().st_size > 10_000


def test_resume_after_kill_matches_uninterrupted(trained, tiny_model_dir, tiny_sst2_dir,
                                                 tmp_path, monkeypatch):
  workdir = tmp_path / "killed"
  config = tiny_config(tiny_model_dir, tiny_sst2_dir)
  real_step = classifier.compiled_step
  calls = {"n": 0}

  def dying_step(*args, **kwargs):
    fn = real_step(*args, **kwargs)

    def step(*a):
      calls["n"] += 1
      if calls["n"] == 5:  # after the step-3 checkpoint, before step 6's
        raise KeyboardInterrupt("simulated kill")
      return fn(*a)
    return step

  monkeypatch.setattr(classifier, "compiled_step", dying_step)
  with pytest.raises(KeyboardInterrupt):
    classifier.train_and_evaluate(config, workdir)
  monkeypatch.setattr(classifier, "compiled_step", real_step)
  assert wd.checkpoint_manager(workdir).latest_step() == 3
  assert not (workdir / wd.COMPLETE).exists()  # benchmarks resume it, not reuse it
  classifier.train_and_evaluate(config, workdir)
  assert json.loads((workdir / wd.COMPLETE).read_text())["step"] == 18
  ours, ref = _params(workdir), _params(trained[0])
  assert ours.step == ref.step == 18  # 2 epochs x 9 batches (two buckets, partial batches padded)
  for a, b in zip(jax.tree.leaves(ours.pre.params), jax.tree.leaves(ref.pre.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, tiny_sst2_dir, tmp_path):
  config = tiny_config(tiny_model_dir, tiny_sst2_dir, learning_rate=float("nan"), profile="flat")
  with pytest.raises(FloatingPointError, match="loss became nan at step 2.*no checkpoint"):
    classifier.train_and_evaluate(config, tmp_path / "nan")


STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, optax
    from jax.sharding import Mesh

    from latadj_jax import models
    from latadj_jax.training import classifier, loop
    sys.path.insert(0, sys.argv[1])
    model = models.build({"model_type": "bert", "vocab_size": 60, "hidden_size": 16,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                          "max_position_embeddings": 32}).with_dropout(0.0)
    params = jax.tree.map(np.asarray, model.init())
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 60, (8, 16)).astype(np.int32)
    mask = (np.arange(16)[None] < rng.integers(3, 17, (8, 1))).astype(np.int32)
    batch = dict(input_ids=ids * mask, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                 labels=rng.integers(0, 2, 8).astype(np.int32),
                 weights=np.array([1, 1, 1, 1, 1, 0, 1, 0], np.float32))
    out = {}
    for n in (1, 4):
      mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
      # SGD, not Adam: Adam's first step is ~lr*sign(g), which turns ulp-level gradient
      # differences on near-zero gradients into lr-sized parameter differences.
      state = loop.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.5))
      state = loop._replicate(state, mesh)
      step = classifier.compiled_step(mesh, model, (16, 9), False)
      state, m = step(state, loop.shard_batch(batch, mesh), jax.random.PRNGKey(0))
      out[n] = (float(m["loss"]), [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)])
    print(json.dumps({"devices": jax.device_count(), "loss": [out[1][0], out[4][0]],
                      "maxdiff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                     for a, b in zip(out[1][1], out[4][1]))}))
""")


def test_four_devices_match_one_device(tmp_path):
  script = tmp_path / "step.py"
  script.write_text(STEP_SCRIPT)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, str(script), str(REPO)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4
  assert result["loss"][0] == pytest.approx(result["loss"][1], abs=1e-5)
  assert result["maxdiff"] < 1e-5


def test_restored_params_live_on_the_device(trained):
  leaves = jax.tree.leaves(_params(trained[0]).pre.params)
  assert leaves and all(isinstance(x, jax.Array) and not isinstance(x, np.ndarray) for x in leaves)


def test_each_bucket_compiles_its_step_once(tiny_model_dir, tiny_sst2_dir, tmp_path, monkeypatch):
  # The state the step returns must be placed like the one it took, or step 2 recompiles.
  built, real = [], classifier.compiled_step
  monkeypatch.setattr(classifier, "compiled_step", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
  classifier.train_and_evaluate(tiny_config(tiny_model_dir, tiny_sst2_dir, num_epochs=1), tmp_path)
  assert len(built) == 2 and all(fn._cache_size() == 1 for fn in built)  # buckets 16 and 32


def _train_cli(*args):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_train_cli_errors_are_one_line(tiny_model_dir, tmp_path):
  unknown = _train_cli("--config=nope")
  assert unknown.returncode == 2 and "unknown config 'nope'" in unknown.stderr
  assert "glue_sst2" in unknown.stderr and "Traceback" not in unknown.stderr
  bad = _train_cli("--config=glue_sst2", "--config.coeff=0", f"--workdir={tmp_path}")
  assert bad.returncode == 2 and "coeff" in bad.stderr and "Traceback" not in bad.stderr
  missing = _train_cli("--config=glue_sst2", f"--config.model={tiny_model_dir}",
                       f"--config.data_dir={tmp_path / 'no_such_dir'}", f"--workdir={tmp_path}")
  assert missing.returncode == 2 and "no_such_dir" in missing.stderr
  assert "Traceback" not in missing.stderr


def test_hub_unreachable_fails_fast_with_guidance(tmp_path):
  import time
  start = time.time()
  proc = _train_cli("--config=glue_sst2", f"--workdir={tmp_path}")  # HF_HUB_OFFLINE=1
  assert time.time() - start < 30
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "bert-base-uncased" in proc.stderr
  assert "--config.model=DIR" in proc.stderr and "--config.data_dir=DIR" in proc.stderr
