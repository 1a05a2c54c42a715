"""A GLUE baseline against HF's Trainer, seed by seed (STS-B: issue 22; CoLA: issue 41).

    python benchmarks/glue_seeds.py --task stsb         # seeds 0,1,2: HF Trainer, then ours
    python benchmarks/glue_seeds.py --task cola --seeds 0 --only hf

One HF run at one seed is not a baseline: a seed decides the head's random
initialisation, the dropout masks and the data order. (For STS-B,
``stsb_torch_steps.py`` showed that our training step equals torch's on
identical batches.) This script runs both recipes at several seeds and reports
each run and the spread:

* ``hf``: ``transformers.Trainer`` as ``shared/data/README.md``'s reference ran it
  (``BertForSequenceClassification`` from the MiniLM checkpoint, ``set_seed``
  before the head is made, batch 32, AdamW lr 5e-5, weight decay 0.01, linear
  schedule, 6% warmup, dynamic padding, gradient clip 1.0 (its default), max
  length 64, 3 epochs); the dev set scored in one padded batch per 64;
* ``ours``: ``train.py --config=glue_<task> --config.recipe=single`` with the same
  recipe, no elimination (the stage 1 of the two-stage recipe).

Resumable: finished (recipe, seed) rows in the JSON are kept. Writes
``benchmarks/results/<task>_seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = {"stsb": "glue_stsb", "cola": "glue_cola", "sst2": "glue_sst2"}
DATA = {"stsb": "STS-B", "cola": "CoLA", "sst2": "sst2"}
METRIC = {"stsb": "pearson", "cola": "mcc", "sst2": "accuracy"}


def hf_trainer_run(task_name: str, model_dir: str, data_dir: str, seed: int, epochs: int,
                   max_train_examples: int = 0) -> dict:
  """Trains and scores one HF Trainer run; returns its dev metrics and wall time."""
  import numpy as np
  import torch
  import transformers
  from datasets import Dataset

  from latadj_jax.core import metrics
  from latadj_jax.data import sources

  torch.set_num_threads(2)
  task = sources.get_task(task_name)
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)

  def dataset(split: str, max_examples: int = 0) -> Dataset:
    ex = sources.load_split(task, split, data_dir=data_dir, max_examples=max_examples)
    enc = tok(*ex.texts, truncation=True, max_length=64)
    dtype = np.float32 if task.is_regression else np.int64
    return Dataset.from_dict({**enc, "labels": ex.labels.astype(dtype)})

  train, dev = dataset("train", max_train_examples), dataset("validation")
  transformers.set_seed(seed)  # before the head is made, as HF's example scripts do
  model = transformers.BertForSequenceClassification.from_pretrained(model_dir,
                                                                     num_labels=task.num_labels)
  with tempfile.TemporaryDirectory() as tmp:
    targs = transformers.TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=5e-5, weight_decay=0.01, num_train_epochs=epochs, warmup_steps=0.06,
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=seed, save_strategy="no",
        eval_strategy="no", report_to=[], logging_steps=100, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train,
                                   data_collator=transformers.DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    logits = trainer.predict(dev).predictions
  preds = logits.reshape(-1) if task.is_regression else logits.argmax(-1)
  return {**metrics.compute_metrics(task.metrics, preds, np.asarray(dev["labels"])),
          "final_train_loss": out.training_loss, "steps": out.global_step, "wall_seconds": wall}


def ours_run(task_name: str, model_dir: str, data_dir: str, seed: int, epochs: int,
             root: Path) -> dict:
  """Trains one ``train.py`` run without elimination; returns its dev metrics and wall time."""
  workdir = root / f"ours_seed{seed}"
  cmd = [sys.executable, "train.py", f"--config={CONFIGS[task_name]}", "--config.recipe=single",
         f"--config.model={model_dir}",
         f"--config.data_dir={data_dir}", f"--config.num_epochs={epochs}",
         "--config.learning_rate=5e-5", "--config.batch_size=32", "--config.max_len=64",
         "--config.max_grad_norm=1.0", f"--config.seed={seed}", "--config.coeff=1",
         "--config.profile=flat", "--config.progress=false", "--config.log_every=100",
         f"--workdir={workdir}"]
  print("$", " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  log = root / f"ours_seed{seed}.log"
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
  if proc.returncode:
    sys.exit(f"train.py failed; see {log}:\n" + log.read_text()[-3000:])
  rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines() if r.strip()]
  final = {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval_")}
  return {**final, "steps": rows[-1]["step"], "wall_seconds": time.perf_counter() - t0,
          "command": " ".join(cmd[1:])}


def summary(runs: list[dict], metric: str) -> dict:
  ps = [r[metric] for r in runs]
  return {"n": len(ps), "mean": statistics.mean(ps), "min": min(ps), "max": max(ps),
          "stdev": statistics.stdev(ps) if len(ps) > 1 else None}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--task", default="stsb", choices=sorted(CONFIGS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--only", default="hf,ours", help="which recipes to run: hf, ours or both")
  p.add_argument("--epochs", type=int, default=3, help="SST-2 in the README: 1")
  p.add_argument("--max_train_examples", type=int, default=0, help="> 0: a smoke run (hf only)")
  p.add_argument("--data_dir", default="", help="default: shared/data/glue/<task>")
  p.add_argument("--root", type=Path, default=None, help="default: workdirs/<task>_seeds")
  args = p.parse_args()
  args.data_dir = args.data_dir or str(REPO.parent / "shared" / "data" / "glue" / DATA[args.task])
  args.root = args.root or REPO / "workdirs" / f"{args.task}_seeds"
  metric = METRIC[args.task]
  out = REPO / "benchmarks" / "results" / f"{args.task}_seeds.json"
  from configs import quickstart
  model_dir = quickstart.minilm_dir()
  args.root.mkdir(parents=True, exist_ok=True)
  result = json.loads(out.read_text()) if out.exists() else {}
  result.update({"benchmark": f"{args.task}_seeds", "command": "python " + " ".join(sys.argv)})
  runs = result.setdefault("runs", {"hf": {}, "ours": {}})
  for seed in [int(s) for s in args.seeds.split(",")]:
    for recipe in args.only.split(","):
      if str(seed) in runs[recipe]:
        print(f"{recipe} seed {seed}: kept {runs[recipe][str(seed)][metric]:.4f}")
        continue
      row = (hf_trainer_run(args.task, model_dir, args.data_dir, seed, args.epochs,
                            args.max_train_examples)
             if recipe == "hf"
             else ours_run(args.task, model_dir, args.data_dir, seed, args.epochs, args.root))
      runs[recipe][str(seed)] = row
      print(f"{recipe} seed {seed}: {metric} {row[metric]:.4f} ({row['wall_seconds']:.0f} s)",
            flush=True)
      result["summary"] = {r: summary(list(v.values()), metric) for r, v in runs.items() if v}
      out.write_text(json.dumps(result, indent=2) + "\n")
  print("| seed | HF Trainer | ours |\n|---|---|---|")
  for seed in sorted({s for v in runs.values() for s in v}, key=int):
    cells = [f"{runs[r][seed][metric]:.4f}" if seed in runs[r] else "" for r in ("hf", "ours")]
    print(f"| {seed} | " + " | ".join(cells) + " |")
  for r, s in result.get("summary", {}).items():
    print(f"{r}: mean {s['mean']:.4f}, range {s['min']:.4f}-{s['max']:.4f} over {s['n']} seeds")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
