"""Run output: progress bars, JSON-lines and TensorBoard metrics, and the coeff-sweep report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.tuning import evaluate, plots


def progress(total: int, initial: int, desc: str, enabled: bool = True):
  """Returns a tqdm bar (a silent one when disabled)."""
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
              dynamic_ncols=True)


class MetricLogger:
  """Appends metrics to ``metrics.jsonl`` and TensorBoard in the workdir."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def write_results(rows: Sequence[dict], workdir: Path, extra: dict[str, Any],
                  suffix: str = "") -> None:
  """Writes ``eval_results{suffix}.json`` and ``.csv`` into the workdir."""
  wd.write_json(workdir / f"eval_results{suffix}.json", {**extra, "rows": list(rows)})
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(workdir / f"eval_results{suffix}.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})


def sweep_and_report(config, pre, params, eval_enc, buckets, ep, task, workdir: Path,
                     coeffs: Sequence[float] | None = None, cache=None,
                     time_repeats: int | None = None) -> list[dict]:
  """Returns the sweep rows after printing the table and writing results and the Fig. 6 plot."""
  clf = evaluate.Classifier(pre.module, params, eval_enc, buckets, config.eval_batch_size,
                            pre.config.num_hidden_layers, model_id=str(config.model),
                            dtype=config.dtype)
  if cache is not None:
    clf.cache = cache
  coeffs = list(coeffs if coeffs is not None else config.eval_coeffs)
  repeats = time_repeats or config.get("time_repeats", 10)
  rows = evaluate.sweep(clf, coeffs, ep, task.metrics, task.is_regression,
                        time_repeats=repeats, progress=config.get("progress", True))
  print(evaluate.format_table(rows, task.metrics))
  print(clf.cache.stats)
  write_results(rows, workdir, {"device": timing.device_name(), "task": task.name,
                                "model": str(config.model), "profile": list(ep),
                                "dtype": config.dtype, "cache": vars(clf.cache.stats)},
                suffix=config.get("results_suffix", ""))
  if len(rows) > 1:
    plots.plot_sweep(rows, task.main_metric,
                     workdir / f"eval_sweep{config.get('results_suffix', '')}.png",
                     title=f"{task.name}: offline tuning of one fine-tuned model")
  return rows
