"""A run config's task and its tokenized splits: what training and evaluation both read."""

from __future__ import annotations

import ml_collections

from latadj_jax.data import pipeline, sources


def task_of(config: ml_collections.ConfigDict) -> sources.TaskSpec:
  """Returns the task spec, with ``num_labels`` overridden when the config sets it."""
  overrides = {"num_labels": config.num_labels} if config.get("num_labels") else {}
  return sources.get_task(config.task, **overrides)


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
