"""Several processes on JAX's distributed runtime give the one-process model (issue 19).

Every run here is real: ``train.py`` under ``python -m latadj_jax.launch`` on
127.0.0.1, two processes with two CPU devices each, against one plain process
with four. The BERT chain is: a one-process reference run; a two-process run
whose process 1 is SIGKILLed after the step-6 checkpoint; its two-process
rerun, which must resume there and end on the reference's losses, parameters,
ACC profile and dev metrics (the dev set does not divide evenly over the
processes); then a one-process restore of that two-process checkpoint, and a
two-process resume of a one-process checkpoint. Each subprocess has a timeout.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from latadj_jax.runtime import launch, multihost
from latadj_jax.runtime import workdir as wd
from latadj_jax.tuning import offline

from conftest import make_sentences
from test_lm import text_dir, tiny_lm_config  # noqa: F401  (text_dir is a fixture)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600      # per launched run: a bound, not an expectation (a run takes well under a minute)
GRACE_S = 3          # launcher: seconds the survivors get after one process fails
DEV_EXAMPLES = 21    # 3 eval batches of 8 (the last one 5 rows): uneven over 2 processes
BERT = dict(data_source="local", max_len=32, buckets=(32,), batch_size=8, eval_batch_size=8,
            num_epochs=1, learning_rate=1e-3, warmup_ratio=0.1, log_every=1, checkpoint_every=3,
            keep_checkpoints=3, profile="acc", profile_batches=3, coeff=0.8,
            max_eval_examples=DEV_EXAMPLES, eval_coeffs=(), progress=False, recipe="single")
STEPS = 8            # 64 training examples / 8

WRAPPER = textwrap.dedent("""
    # Runs train.py (args after the first 4). DIE > 0: SIGKILLs process VICTIM once the
    # step-DIE checkpoint is on disk. LOGITS: saves each process's gathered dev logits there.
    import os, runpy, signal, sys
    import jax, numpy as np
    from latadj_jax.tasks import classify
    from latadj_jax.runtime import workdir as wd
    repo, die, victim, logits_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    save, predict = wd.save_checkpoint, classify.Classifier.predict

    def save_then_die(manager, step, state):
      save(manager, step, state)
      if step == die:
        manager.wait_until_finished()  # every process: the checkpoint is complete
        if jax.process_index() == victim:
          print(f"killing process {victim} after the step-{step} checkpoint", flush=True)
          os.kill(os.getpid(), signal.SIGKILL)

    def predict_and_save(self, schedules, across_processes=False):
      logits = predict(self, schedules, across_processes)
      if across_processes and logits_dir:
        np.save(os.path.join(logits_dir, f"p{jax.process_index()}.npy"), logits)
      return logits

    wd.save_checkpoint, classify.Classifier.predict = save_then_die, predict_and_save
    sys.argv = [os.path.join(repo, "train.py")] + sys.argv[5:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """Lets the launched runs share compiled programs (the first run of each kind compiles them)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    yield


def _overrides(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


def _one_process(args: list[str], devices: int = 4) -> str:
  """Runs a script in one plain process with ``devices`` CPU devices; returns its output."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def _launch(args: list[str], processes: int = 2, watch: str = "") -> tuple[int, str, float | None]:
  """Returns (exit status, output, seconds from the line containing ``watch`` to the launcher's exit)."""
  cmd = [sys.executable, "-m", "latadj_jax.launch", f"--processes={processes}",
         "--devices_per_process=2", f"--grace_s={GRACE_S}", "--", *args]
  # Its own session, so a timeout takes the launcher's children down with it.
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  timed_out = threading.Event()

  def kill():
    timed_out.set()
    os.killpg(proc.pid, signal.SIGKILL)
  timer = threading.Timer(TIMEOUT_S, kill)
  timer.start()
  lines, seen = [], None
  for line in proc.stdout:
    lines.append(line)
    if watch and watch in line and seen is None:
      seen = time.monotonic()
  rc = proc.wait()
  timer.cancel()
  out = "".join(lines)
  assert not timed_out.is_set(), f"no exit within {TIMEOUT_S} s:\n{out[-3000:]}"
  return rc, out, None if seen is None else time.monotonic() - seen


def _train(workdir: Path, config: dict, name: str = "glue_sst2") -> list[str]:
  return ["train.py", f"--config={name}", f"--workdir={workdir}", *_overrides(config)]


def _wrapped(workdir: Path, config: dict, die: int = 0, logits: Path | str = "") -> list[str]:
  """Returns the arguments that run train.py through WRAPPER (written beside the workdir)."""
  script = workdir.parent / "wrapper.py"
  script.write_text(WRAPPER)
  return [str(script), str(REPO), str(die), "1", str(logits), *_train(workdir, config)[1:]]


def _metrics(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: Path) -> list[tuple[int, float]]:
  return [(m["step"], m["loss"]) for m in _metrics(workdir) if "loss" in m]


def _evals(workdir: Path) -> list[dict]:
  return [m for m in _metrics(workdir) if any(k.startswith("eval_") for k in m)]


def _assert_same_params(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


# --- the launcher alone --------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, sys, time
    i = int(os.environ["JAX_PROCESS_ID"])
    print("hello", i, os.environ["JAX_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"],
          os.environ["JAX_CPU_COLLECTIVES_IMPLEMENTATION"], os.environ["XLA_FLAGS"], flush=True)
    if i == 1:
      sys.exit(3)
    time.sleep(600)  # process 0 would hang forever: the launcher must end it
""")


@pytest.mark.slow
def test_launcher_sets_env_prefixes_output_and_stops_the_others_on_failure(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  t0 = time.monotonic()
  rc, out, _ = _launch([str(script)])
  assert rc == 3, out
  assert time.monotonic() - t0 < GRACE_S + 30, out  # not the 600 s of the sleeping process
  for i in (0, 1):
    line = next(l for l in out.splitlines() if l.startswith(f"[p{i}] hello"))
    _, _, pid, n, address, collectives, *flags = line.split()  # the parent's XLA_FLAGS are kept
    assert (pid, n, collectives) == (str(i), "2", "gloo") and address.startswith("127.0.0.1:")
    assert [f for f in flags if "device_count" in f] == ["--xla_force_host_platform_device_count=2"]
  assert "[launch] process 1 exited with 3" in out and "p1=3" in out


def test_exit_codes_and_env():
  assert launch.exit_code(-9) == 137 and launch.exit_code(2) == 2
  env = launch.process_env({"XLA_FLAGS": "--xla_foo --xla_force_host_platform_device_count=8"},
                           1, 3, 1234, 2)
  assert env[multihost.PROCESS_ID] == "1" and env[multihost.NUM_PROCESSES] == "3"
  assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=2"


# --- tiny BERT: one process against two ---------------------------------------------------------
@pytest.fixture(scope="module")
def bert_config(tiny_model_dir, tiny_sst2_dir) -> dict:
  return dict(BERT, model=str(tiny_model_dir), data_dir=str(tiny_sst2_dir))


@pytest.fixture(scope="module")
def bert_ref(bert_config, tmp_path_factory) -> Path:
  """Returns the workdir of the uninterrupted one-process, four-device run."""
  workdir = tmp_path_factory.mktemp("bert_ref")
  _one_process(_train(workdir, bert_config))
  return workdir


@pytest.fixture(scope="module")
def bert_killed(bert_config, tmp_path_factory) -> tuple[Path, int, str, float]:
  """Returns (workdir, exit status, output, seconds from the kill to the launcher's exit)."""
  workdir = tmp_path_factory.mktemp("bert_two")
  rc, out, after_kill = _launch(_wrapped(workdir, bert_config, die=6), watch="killing process 1")
  return workdir, rc, out, after_kill


@pytest.fixture(scope="module")
def bert_resumed(bert_killed, bert_config, tmp_path_factory) -> tuple[Path, str, Path]:
  """Returns (workdir, output, dir of each process's final dev logits) of the killed run's rerun."""
  workdir, logits = bert_killed[0], tmp_path_factory.mktemp("logits")
  # With a post-training sweep: process 1 waits while process 0 alone writes the report.
  config = dict(bert_config, eval_coeffs=(1.0,), time_repeats=1)
  rc, out, _ = _launch(_wrapped(workdir, config, logits=logits))
  assert rc == 0, out[-5000:]
  return workdir, out, logits


@pytest.mark.slow
def test_killing_one_process_ends_the_run_fast_and_keeps_the_last_checkpoint(bert_killed):
  workdir, rc, out, after_kill = bert_killed
  assert after_kill is not None, out[-5000:]  # process 1 reached the step-6 checkpoint and died
  assert rc != 0 and "p1=-9" in out, out[-3000:]  # process 0 may notice first: any order
  assert after_kill < GRACE_S + 60, out[-3000:]  # process 0, stuck in a collective, is ended
  assert wd.checkpoint_manager(workdir).latest_step() == 6
  assert max(s for s, _ in _losses(workdir)) == 6


@pytest.mark.slow
def test_two_processes_resume_and_train_the_one_process_model(bert_ref, bert_resumed):
  workdir, out, _ = bert_resumed
  assert "[p0] resumed from step 6" in out and "[p1] resumed from step 6" in out
  assert "[p0] | coeff | accuracy |" in out and "[p1] | coeff" not in out
  assert json.loads((workdir / "eval_results.json").read_text())["rows"][0]["coeff"] == 1.0
  ours, ref = _losses(workdir), _losses(bert_ref)
  # Each step logged once, by process 0 alone: steps 1-6 by the killed run, 7-8 by the rerun.
  assert [s for s, _ in ours] == [s for s, _ in ref] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in ours], [l for _, l in ref], atol=1e-5, rtol=0)
  a, b = offline.restore(workdir), offline.restore(bert_ref)  # 2-process checkpoint, 1 process
  assert a.step == b.step == STEPS
  _assert_same_params(a.pre.params, b.pre.params)


@pytest.mark.slow
def test_acc_profile_and_uneven_dev_metrics_equal_one_process(bert_ref, bert_resumed, bert_config):
  workdir = bert_resumed[0]
  r = offline.restore(workdir)
  config = r.run.config
  from latadj_jax.data import pipeline, splits
  (dev,) = splits.load_encoded_split(config, r.task, r.tokenizer, "validation", DEV_EXAMPLES)
  assert len(dev) == DEV_EXAMPLES and pipeline.num_batches(dev, 8, r.buckets) % 2 == 1
  ours, ref = (json.loads((w / "profile.json").read_text()) for w in (workdir, bert_ref))
  assert len(ours["acc"]) == 3
  for key in ("acc", "fit", "ep"):
    np.testing.assert_allclose(ours[key], ref[key], atol=1e-6, rtol=0)
  assert ours["schedules"] == ref["schedules"]
  (ev_ours,), (ev_ref,) = _evals(workdir), _evals(bert_ref)
  assert ev_ours["step"] == ev_ref["step"] == STEPS
  assert ev_ours["eval_accuracy"] == pytest.approx(ev_ref["eval_accuracy"], abs=1e-9)
  # Each process's gathered dev logits are those of one process predicting every example.
  from latadj_jax.tuning.sweep import schedules_for
  clf = offline.classifier(r, dev)
  one = clf.predict(schedules_for(0.8, r.run.profile, r.buckets))
  for i in (0, 1):
    np.testing.assert_allclose(np.load(bert_resumed[2] / f"p{i}.npy"), one, atol=1e-6, rtol=0)
  (row,) = offline.evaluate_workdir(workdir, [0.8], max_examples=DEV_EXAMPLES, time_repeats=1)
  assert row["accuracy"] == pytest.approx(ev_ours["eval_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_two_process_checkpoint_serves_in_one_process(bert_ref, bert_resumed):
  from latadj_jax.serving import predictor
  texts = [s for s, _ in make_sentences(5, seed=7)]
  ours = predictor.Predictor.from_workdir(bert_resumed[0], coeff=0.8).logits(texts)
  ref = predictor.Predictor.from_workdir(bert_ref, coeff=0.8).logits(texts)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two(bert_ref, bert_config, tmp_path):
  workdir = tmp_path / "from_one"
  shutil.copytree(bert_ref, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # back to the step-6 checkpoint
  rc, out, _ = _launch(_train(workdir, bert_config))
  assert rc == 0, out[-5000:]
  assert "[p1] resumed from step 6" in out
  _assert_same_params(offline.restore(workdir).pre.params, offline.restore(bert_ref).pre.params)


# --- the LM trainer ------------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_two_processes_match_one_process(text_dir, tmp_path):  # noqa: F811
  config = tiny_lm_config(text_dir, eval_batch_size=4, max_eval_examples=12, profile_batches=1,
                          log_every=1)  # 3 eval batches; process 1 profiles nothing
  values = {k: config[k] for k in ("data_dir", "block_size", "max_len", "buckets", "batch_size",
                                   "eval_batch_size", "max_train_examples", "max_eval_examples",
                                   "num_epochs", "learning_rate", "profile", "profile_batches",
                                   "coeff", "log_every", "checkpoint_every", "eval_coeffs",
                                   "progress")}
  values.update({f"gpt2.{k}": v for k, v in config.gpt2.items()})
  one, two = tmp_path / "one", tmp_path / "two"
  _one_process(_train(one, values, "lm_text"))
  rc, out, _ = _launch(_train(two, values, "lm_text"))
  assert rc == 0, out[-5000:]
  from latadj_jax.tasks import lm_eval
  ours, ref = _losses(two), _losses(one)
  assert [s for s, _ in ours] == [s for s, _ in ref] and len(ref) == 6
  np.testing.assert_allclose([l for _, l in ours], [l for _, l in ref], atol=1e-5, rtol=0)
  _assert_same_params(lm_eval.restore(two).params, lm_eval.restore(one).params)
  (ev_ours,), (ev_ref,) = _evals(two), _evals(one)
  assert ev_ours["eval_perplexity"] == pytest.approx(ev_ref["eval_perplexity"], rel=1e-6)
  assert ev_ours["eval_fraction_scored"] == pytest.approx(ev_ref["eval_fraction_scored"], rel=1e-9)
  p_ours, p_ref = (json.loads((w / "profile.json").read_text()) for w in (two, one))
  np.testing.assert_allclose(p_ours["acc"], p_ref["acc"], atol=1e-6, rtol=0)
