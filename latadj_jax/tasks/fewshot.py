"""Few-shot MMLU and BBH with T5 against the speedup coefficient k, with no training.

As in the paper's Flan-T5 experiment (its Table VI), one set of weights is
evaluated at several k: the encoder keeps ``N_l`` word-vectors per layer (flat
profile by default, so ``R_l = k``; or a profile measured from ACC on the
prompts), then the decoder generates greedily with a KV cache. Prompts are
bucketed by length, so each (bucket, keep counts) pair compiles once.

For each k the sweep (``tuning.sweep``) reports the exact-match score, and on
the bucket holding most prompts: the encoder's expected speedup (eq. 7), its
XLA FLOPs ratio, its measured speedup against no elimination (k = 1, flat;
medians of interleaved runs) and the end-to-end generation latency of one batch.
``Prompts`` is what this harness shares with the causal one (``fewshot_lm``).

    python eval.py --config=flan_t5_mmlu --coeff 0.9
    python eval.py --config=flan_t5_bbh --config.data_dir=DIR --coeff 1.0,0.9,0.8

Readers, prompts and scoring are in ``latadj_jax.data.fewshot``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import jax
import numpy as np

from latadj_jax import models
from latadj_jax.data import fewshot as fs
from latadj_jax.data import pipeline
from latadj_jax.models import generate as gen
from latadj_jax.runtime import timing

RESULTS = "fewshot_results.json"
PREDICTIONS = "fewshot_predictions.jsonl"


@dataclasses.dataclass
class Prompts:
  """A model and the tokenized, bucketed prompts of one benchmark (the few-shot harnesses' base)."""
  pre: models.Pretrained
  tokenizer: Any
  bench: fs.Benchmark
  prompts: fs.Prompts
  batches: list[dict]
  ITEM_KEYS: ClassVar[tuple[str, ...]] = ()  # row keys holding one value per item (PREDICTIONS)

  @property
  def num_layers(self) -> int:
    return self.pre.model.num_layers

  @property
  def model(self) -> models.Model:
    return self.pre.model

  @property
  def params(self) -> Any:
    return self.pre.params

  def bucket_sizes(self) -> dict[int, int]:
    """Returns how many prompts fall in each bucket."""
    sizes: dict[int, int] = {}
    for b in self.batches:
      n = int((b["index"] >= 0).sum())
      sizes[b["input_ids"].shape[1]] = sizes.get(b["input_ids"].shape[1], 0) + n
    return sizes

  def main_batch(self, bucket: int) -> dict:
    return next(b for b in self.batches if b["input_ids"].shape[1] == bucket)

  def acc_batches(self, count: int) -> list[dict]:
    """Returns the first ``count`` batches (at least one), to measure ACC on."""
    return [{**b, "weights": (b["index"] >= 0).astype(float)} for b in self.batches[:max(1, count)]]

  def meta(self, config) -> dict:
    """Returns what the results file states about the benchmark and its prompts."""
    bench, prompts = self.bench, self.prompts
    return {
        "benchmark": bench.name, "model": str(config.model), "source": bench.source,
        "protocol": bench.protocol, "num_items": len(bench.items),
        "num_shots": int(config.num_shots), "mean_shots_used": float(np.mean(prompts.shots_used)),
        "prompts_with_fewer_shots": int(sum(n < min(config.num_shots, len(it.shots))
                                            for n, it in zip(prompts.shots_used, bench.items))),
        "prompts_truncated": prompts.num_truncated, "max_len": int(config.max_len),
        "bucket_sizes": {str(b): n for b, n in sorted(self.bucket_sizes().items())},
        "batch_size": int(config.batch_size)}

  def write_items(self, out_dir: Path, rows: Sequence[dict]) -> None:
    """Writes one predictions line per item: its prompt, and each k's per-item outputs."""
    with open(Path(out_dir) / PREDICTIONS, "w") as f:
      for i, it in enumerate(self.bench.items):
        f.write(json.dumps({"task": it.task, "target": it.query.target,
                            "shots": self.prompts.shots_used[i],
                            "prompt_tokens": len(self.prompts.encoded.input_ids[i]),
                            "by_coeff": {f"{r['coeff']:g}": {k: r[k][i] for k in self.ITEM_KEYS}
                                         for r in rows}}) + "\n")


@dataclasses.dataclass
class Harness(Prompts):
  """A sequence-to-sequence model's few-shot prompts: the T5 few-shot task's ``Evaluation``."""
  max_new_tokens: int = 1
  metrics: ClassVar[dict[str, str]] = {"score": "%"}
  ITEM_KEYS: ClassVar[tuple[str, ...]] = ("answer", "generation")

  def score(self, schedules: Mapping[int, tuple[int, ...]]) -> dict:
    generations = predict(self, schedules)
    out = exact_match_scores(self.bench.items, generations)
    return {**out, "generation": generations}

  def timed(self, bucket: int, counts: tuple[int, ...]) -> dict[str, timing.Timed]:
    """Returns the encoder and the whole generation of one real batch of ``bucket``."""
    batch = self.main_batch(bucket)
    args = (jax.device_put(batch["input_ids"]), jax.device_put(batch["attention_mask"]))
    encode = jax.jit(lambda p, i, m: self.model.apply(p, models.Batch(i, m), counts).last_hidden_state)
    exe = encode.lower(self.params, *args).compile()
    generate_ = lambda: gen.generate(self.model, self.params, *args,
                                     max_new_tokens=self.max_new_tokens, keep_counts=counts)["tokens"]
    return {"encoder": timing.Timed(lambda: exe(self.params, *args), timing.compiled_flops(exe)),
            "generate": timing.Timed(generate_)}


def load_t5(model: str, dtype: str = "float32") -> tuple[models.Pretrained, Any]:
  """Returns a sequence-to-sequence model (HF weights) and its tokenizer, or raises ValueError."""
  import transformers
  try:
    pre = models.from_pretrained(model, dtype=dtype, kind="seq2seq")
  except models.KindError as e:
    raise ValueError(f"the few-shot harness runs encoder-decoder models: {e}. Pass "
                     f"--config.model=google/flan-t5-base or a local T5 directory") from None
  return pre, transformers.AutoTokenizer.from_pretrained(str(pre.model_dir))


def build(config, bench: fs.Benchmark, pre: models.Pretrained, tokenizer) -> Harness:
  """Returns the harness: prompts tokenized (shots fitted to ``max_len``) and batched by bucket."""
  prompts = fs.tokenize(bench.items, tokenizer, config.max_len, config.num_shots)
  buckets = pipeline.make_buckets(config.max_len, base=tuple(config.buckets))
  batches = list(pipeline.batch_iterator(prompts.encoded, config.batch_size, buckets,
                                         shuffle=False, pad_id=tokenizer.pad_token_id))
  for b in batches:  # a filler row gets one valid token, so no row is all padding
    b["attention_mask"][b["index"] < 0, 0] = 1
  new_tokens = config.max_new_tokens
  if new_tokens <= 0:  # room for the longest target and one token to show what follows it
    targets = {it.query.target for it in bench.items}
    new_tokens = 1 + max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
  return Harness(pre, tokenizer, bench, prompts, batches, max_new_tokens=int(new_tokens))


def generate(h: Harness, batch: dict, counts: tuple[int, ...]) -> jax.Array:
  """Returns the greedy tokens [B, max_new_tokens] of one batch with encoder keep counts ``counts``."""
  return gen.generate(h.pre.model, h.pre.params, batch["input_ids"], batch["attention_mask"],
                      max_new_tokens=h.max_new_tokens, keep_counts=counts)["tokens"]


def predict(h: Harness, schedules: dict[int, tuple[int, ...]]) -> list[str]:
  """Returns the decoded generation of every prompt, in item order."""
  out = [""] * len(h.bench.items)
  for b in h.batches:
    tokens = np.asarray(generate(h, b, schedules[b["input_ids"].shape[1]]))
    for row, text in zip(b["index"], h.tokenizer.batch_decode(tokens, skip_special_tokens=True)):
      if row >= 0:
        out[row] = text
  return out


def exact_match_scores(items: Sequence[fs.Item], generations: Sequence[str]) -> dict:
  """Returns the exact-match score over all items, the mean over tasks, and per task."""
  preds = [fs.extract_answer(g, bool(it.query.choices)) for it, g in zip(items, generations)]
  hits = fs.exact_match(preds, [it.query.target for it in items])
  tasks = [it.task for it in items]
  per_task = {t: float(hits[[x == t for x in tasks]].mean()) for t in dict.fromkeys(tasks)}
  return {"score": float(hits.mean()), "correct": int(hits.sum()), "num_items": len(items),
          "macro_score": float(np.mean(list(per_task.values()))), "per_task": per_task,
          "answer": preds}


def load_harness(config, load_model, build_harness):
  """Returns ``build_harness(config, bench, *load_model(model, dtype))``, the benchmark read first,
  so a missing file or an offline hub fails before the model loads."""
  bench = fs.load_benchmark(config)
  if not bench.items:
    raise ValueError(f"no {config.benchmark} items to evaluate ({bench.protocol})")
  print(f"{bench.name}: {bench.protocol}")
  return build_harness(config, bench, *load_model(config.model, config.dtype))


def prepare(config) -> tuple[Harness, dict]:
  """Returns the harness of a few-shot config and what its results file states about it."""
  h = load_harness(config, load_t5, build)
  meta = {**h.meta(config), "max_new_tokens": h.max_new_tokens,
          "timing": "encoder_ms, generate_ms: one batch of real prompts of the main bucket, medians "
                    "of runs interleaved with the baseline = no elimination (k = 1, flat profile); "
                    "eval_seconds: wall time to score every prompt, compiles included"}
  return h, meta
