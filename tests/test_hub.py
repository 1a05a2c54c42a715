"""The hub path, against a local stand-in for the HF hub (issue 18).

``python train.py --config=glue_sst2`` with no local flags downloads
``bert-base-uncased`` and GLUE SST-2. Here ``tests/fake_hub.py`` serves a tiny
BERT under that id and a tiny GLUE-layout dataset as ``nyu-mll/glue`` on
127.0.0.1, reached through ``HF_ENDPOINT``; ``train.py`` and ``eval.py`` run
against it as subprocesses with the hub on (``HF_HUB_OFFLINE`` unset) and
empty HF caches. A hub that errors or stalls must end the run with one clear
line, well before the subprocess timeout.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_sentences
from fake_hub import FakeHub

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test starts train.py or eval.py
# Shrinks the run; none of these names a local model or data source.
SMALL = ["--config.max_len=32", "--config.buckets=(16,32)", "--config.batch_size=8",
         "--config.eval_batch_size=8", "--config.max_steps=2", "--config.eval_every_epoch=false",
         "--config.eval_coeffs=(1.0,)", "--config.time_repeats=1", "--config.profile_batches=1",
         "--config.progress=false", "--config.recipe=single"]
GLUE_CARD = """---
configs:
- config_name: sst2
  data_files:
  - split: train
    path: sst2/train-*
  - split: validation
    path: sst2/validation-*
---
# GLUE, SST-2 only, a few dozen generated sentences
"""


@pytest.fixture(scope="module")
def glue_repo(tmp_path_factory) -> Path:
  """Returns a dataset repo in the hub's GLUE layout: a YAML card and parquet shards under sst2/."""
  root = tmp_path_factory.mktemp("glue_repo")
  (root / "sst2").mkdir()
  for split, n, seed in (("train", 48, 0), ("validation", 16, 1)):
    rows = make_sentences(n, seed)
    pd.DataFrame({"sentence": [s for s, _ in rows], "label": [l for _, l in rows],
                  "idx": range(n)}).to_parquet(root / "sst2" / f"{split}-00000-of-00001.parquet")
  (root / "README.md").write_text(GLUE_CARD)
  return root


def _env(hub: FakeHub, tmp: Path) -> dict:
  """Returns a subprocess environment with the hub on, at ``hub``, and empty caches under ``tmp``."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "LATADJ_DEBUG"}
  env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf_home"),
             HF_DATASETS_CACHE=str(tmp / "hf_datasets"), HF_HUB_DISABLE_TELEMETRY="1")
  return env


def _run(script: str, args: list[str], env: dict, timeout: float = 400):
  return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_train_and_eval_through_the_hub(tiny_model_dir, glue_repo, tmp_path):
  workdir = tmp_path / "run"
  with FakeHub(models={"bert-base-uncased": tiny_model_dir},
               datasets={"nyu-mll/glue": glue_repo}) as hub:
    env = _env(hub, tmp_path)
    train = _run("train.py", ["--config=glue_sst2", f"--workdir={workdir}", *SMALL], env)
    assert train.returncode == 0, train.stderr[-3000:]
    served = hub.requests()
    for path in ("/bert-base-uncased/resolve/", "/model.safetensors", "/vocab.txt",
                 "/datasets/nyu-mll/glue/resolve/", "/sst2/train-00000-of-00001.parquet",
                 "/sst2/validation-00000-of-00001.parquet"):
      assert any(path in r for r in served), (path, served)
    assert "| coeff | accuracy |" in train.stdout
    assert (tmp_path / "hf_home" / "hub" / "models--bert-base-uncased").is_dir()
    n_before = len(hub.log)
    ev = _run("eval.py", [f"--workdir={workdir}", "--coeff", "1.0", "--repeats", "1"], env)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "| 1 |" in ev.stdout and "on validation: 16 examples" in ev.stdout, ev.stdout[-2000:]
    # eval.py needs no model download (the workdir has the weights) but reads dev from the hub.
    assert any("/api/datasets/nyu-mll/glue" in r for r in hub.log[n_before:]), hub.log[n_before:]
    assert not any("bert-base-uncased" in r for r in hub.log[n_before:])


@pytest.mark.parametrize("target", ["model", "dataset"])
@pytest.mark.parametrize("mode", ["error", "slow"])
def test_a_failing_hub_ends_the_run_with_one_clear_line(tiny_model_dir, glue_repo, tmp_path,
                                                        mode, target):
  # "error": every request gets a 500; "slow": every answer takes a minute (a stalled hub).
  with FakeHub(models={"bert-base-uncased": tiny_model_dir}, datasets={"nyu-mll/glue": glue_repo},
               mode=mode, delay=60) as hub:
    local_model = [f"--config.model={tiny_model_dir}"] if target == "dataset" else []
    start = time.monotonic()
    proc = _run("train.py", ["--config=glue_sst2", f"--workdir={tmp_path / 'run'}", *local_model,
                             *SMALL], _env(hub, tmp_path), timeout=180)
    elapsed = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  why = "answered 500 Internal Server Error" if mode == "error" else "did not answer within 10 s"
  assert f"the hub at {hub.url} {why}" in errors[0], errors[0]
  if target == "model":
    assert "'bert-base-uncased' can't be downloaded" in errors[0] and "--config.model=DIR" in errors[0]
  else:
    assert "nyu-mll/glue" in errors[0] and "--config.data_dir=DIR" in errors[0], errors[0]
    assert not any("bert-base-uncased" in r for r in hub.log)  # the model came from disk
  assert elapsed < 60, f"took {elapsed:.0f} s"  # one probe timeout plus start-up, not retries
