"""ACC profiling before training, and the model/data loading that train and eval share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from latadj_jax import models, plots, schedule, workdir as wd
from latadj_jax.data import pipeline, sources


def task_of(config: ml_collections.ConfigDict) -> sources.TaskSpec:
  """Returns the task spec, with ``num_labels`` overridden when the config sets it."""
  overrides = {"num_labels": config.num_labels} if config.get("num_labels") else {}
  return sources.get_task(config.task, **overrides)


def load_model_and_task(config: ml_collections.ConfigDict):
  """Returns ``(Pretrained, tokenizer, task)`` for a run config (hub id or local dir)."""
  import transformers
  task = task_of(config)
  pre = models.from_pretrained(
      config.model, head="classification", seed=config.seed, num_labels=task.num_labels,
      hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
      dtype=config.dtype)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(pre.model_dir))
  return pre, tokenizer, task


def load_split(config, task, split: str, max_examples: int = 0):
  """Returns the raw examples of one split, from the configured source."""
  kwargs = dict(data_dir=config.data_dir, source=config.data_source, seed=config.seed,
                dev_fraction=config.dev_fraction, max_examples=max_examples)
  if config.get("hub_dataset"):
    kwargs["hub_dataset"] = config.hub_dataset
  return sources.load_split(task, split, **kwargs)


def load_encoded_split(config, task, tokenizer, split: str, max_examples: int = 0):
  """Returns one tokenized split (as a 1-tuple), reporting how many examples were truncated."""
  enc = pipeline.encode(load_split(config, task, split, max_examples), tokenizer, config.max_len)
  if enc.num_truncated:
    print(f"{split}: {enc.num_truncated} of {len(enc.labels)} examples truncated to "
          f"{config.max_len} tokens")
  return (enc,)


def load_encoded(config, task, tokenizer):
  """Returns the tokenized train and validation splits."""
  (train,) = load_encoded_split(config, task, tokenizer, "train", config.max_train_examples)
  (dev,) = load_encoded_split(config, task, tokenizer, "validation", config.max_eval_examples)
  return train, dev


def measure_acc(module: Any, params: Any, batches: Sequence[dict]) -> np.ndarray:
  """Returns the mean ACC per layer over the real examples of ``batches`` (no elimination)."""

  @jax.jit
  def layer_acc(params, ids, mask, types):
    return module.apply({"params": params}, ids, mask, types, output_scores=True)["acc"]

  total, count = 0.0, 0
  for batch in batches:
    acc_BxL = np.asarray(layer_acc(params, batch["input_ids"], batch["attention_mask"],
                                   batch["token_type_ids"]))
    real = batch["weights"] > 0
    total = total + acc_BxL[real].sum(0)
    count += int(real.sum())
  if not count:
    raise ValueError("no examples to profile ACC on")
  return total / count


def parse_profile(value: Any, num_layers: int) -> tuple[float, ...] | None:
  """Returns an explicit profile from ``"flat"``, ``"0.9,0.8,..."`` or a list; None means measure."""
  if isinstance(value, str):
    if value in ("acc", ""):
      return None
    if value == "flat":
      return schedule.flat_profile(num_layers)
    value = [float(v) for v in value.split(",")]
  return schedule.validate_profile(value, num_layers)


def resolve_profile(config, workdir: Path, pre, train_enc, buckets, num_layers: int,
                    write: bool) -> tuple[float, ...]:
  """Returns EP: stored (on resume), given in the config, or measured from ACC now.

  The measurement runs the starting model with no elimination on the first
  ``profile_batches`` shuffled training batches, then fits METHOD.md's curve.
  """
  stored = wd.load_profile(workdir)
  if stored is not None:
    return stored
  ep = parse_profile(config.profile, num_layers)
  prof = None
  if ep is None:
    batches = []
    for batch in pipeline.batch_iterator(train_enc, config.batch_size, buckets, shuffle=True,
                                         seed=config.seed + 1):
      batches.append(batch)
      if len(batches) >= config.profile_batches:
        break
    acc = measure_acc(pre.module, pre.params, batches)
    prof = schedule.profile_from_acc(acc, config.profile_degree)
    ep = prof.ep
  if write:
    scheds = {b: schedule.keep_counts(b, config.coeff, ep) for b in buckets}
    wd.save_profile(workdir, prof, ep, scheds, config.coeff)
    if prof is not None:
      plots.plot_profile(prof, workdir / "profile.png", title=f"{config.task}: {config.model}")
    print(f"profile EP = {[round(e, 3) for e in ep]}")
    for b, c in scheds.items():
      print(f"  bucket {b}: keep counts {list(c)} (expected speedup "
            f"{schedule.expected_speedup(b, c):.2f}x at coeff {config.coeff:g})")
  return ep
