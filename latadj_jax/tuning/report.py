"""Run output: progress bars, JSON-lines and TensorBoard metrics, and the coeff-sweep report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import classify, lm_eval
from latadj_jax.tuning import plots, sweep


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


def sweep_and_report(ev: sweep.Evaluation, runs: Sequence, workdir: Path, meta: dict[str, Any], *,
                     repeats: int = 10, progress: bool = True, suffix: str = "",
                     plot_metric: str = "", title: str = "") -> list[dict]:
  """Returns the sweep rows of ``ev`` after printing the table and writing
  ``eval_results{suffix}.{json,csv}`` (and, with ``plot_metric``, the Fig. 6 plot)."""
  rows = sweep.sweep(ev, runs, repeats=repeats, progress=progress)
  print(sweep.format_table(rows, ev.metrics))
  meta = {"device": timing.device_name(), **meta}
  cache = getattr(ev, "cache", None)
  if cache is not None:
    print(cache.stats)
    meta["cache"] = vars(cache.stats)
  write_results(rows, workdir, meta, suffix=suffix)
  if plot_metric and len(rows) > 1:
    plots.plot_sweep(rows, plot_metric, workdir / f"eval_sweep{suffix}.png", title=title)
  return rows


def classifier_sweep(config, pre, params, eval_enc, buckets, ep, task, workdir: Path,
                     coeffs: Sequence[float] | None = None, cache=None,
                     time_repeats: int | None = None) -> list[dict]:
  """Returns a trained classifier's sweep over ``coeffs`` (default the config's), reported."""
  clf = classify.Classifier(pre.model, params, eval_enc, buckets, config.eval_batch_size,
                            model_id=str(config.model), dtype=config.dtype,
                            metric_names=tuple(task.metrics), is_regression=task.is_regression)
  if cache is not None:
    clf.cache = cache
  runs = sweep.plans(coeffs if coeffs is not None else config.eval_coeffs, ep)
  return sweep_and_report(
      clf, runs, workdir, {"task": task.name, "model": str(config.model), "profile": list(ep),
                           "dtype": config.dtype},
      repeats=time_repeats or config.get("time_repeats", 10), progress=config.get("progress", True),
      suffix=config.get("results_suffix", ""), plot_metric=task.main_metric,
      title=f"{task.name}: offline tuning of one fine-tuned model")


def lm_sweep(config, model, params, eval_enc, ep: Sequence[float], workdir: Path, *,
             coeffs: Sequence[float] | None = None, model_id: str = "lm",
             time_repeats: int | None = None, lambada: str = "", tokenizer=None,
             max_lambada: int = 0, cache=None) -> list[dict]:
  """Returns an LM's sweep (perplexity, and last-word scores with ``lambada``), reported."""
  last_word = lm_eval.load_last_word(lambada, tokenizer, model, config, max_lambada) if lambada else None
  ev = lm_eval.LMEvaluator(model, params, eval_enc, config.eval_batch_size, model_id, config.dtype,
                           last_word=last_word)
  if cache is not None:
    ev.cache = cache
  runs = sweep.plans(coeffs if coeffs is not None else config.eval_coeffs, ep)
  return sweep_and_report(ev, runs, Path(workdir), {
      "task": "lm", "model": str(config.model or "scratch"),
      "data": str(config.data_dir or config.get("hub_dataset", "")), "lambada": lambada,
      "profile": list(ep),
      "perplexity": "exp(mean NLL) over the positions that reach the last layer; "
                    "fraction_scored is their share of all target positions"},
      repeats=time_repeats or config.get("time_repeats", 10), progress=config.get("progress", True))
