"""Few-shot MMLU and BBH with T5 against the speedup coefficient k, with no training.

As in the paper's Flan-T5 experiment (its Table VI), one set of weights is
evaluated at several k: the encoder keeps ``N_l`` word-vectors per layer (flat
profile by default, so ``R_l = k``; or a profile measured from ACC on the
prompts), then the decoder generates greedily with a KV cache. Prompts are
bucketed by length, so each (bucket, keep counts) pair compiles once.

For each k it reports the exact-match score, and on the bucket holding most
prompts: the encoder's expected speedup (eq. 7), its XLA FLOPs ratio, its
measured speedup against no elimination (k = 1, flat; medians of interleaved
runs) and the end-to-end generation latency of one batch.

    python eval.py --config=flan_t5_mmlu --coeff 0.9
    python eval.py --config=flan_t5_bbh --config.data_dir=DIR --coeff 1.0,0.9,0.8

Readers, prompts and scoring are in ``latadj_jax.data.fewshot``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import fewshot as fs
from latadj_jax.data import pipeline
from latadj_jax.models import checkpoints, t5, t5_generate
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd

RESULTS = "fewshot_results.json"
PREDICTIONS = "fewshot_predictions.jsonl"


@dataclasses.dataclass
class Harness:
  """A T5 model and the tokenized, bucketed prompts of one benchmark."""
  pre: models.Pretrained
  tokenizer: Any
  bench: fs.Benchmark
  prompts: fs.Prompts
  batches: list[dict]
  max_new_tokens: int

  @property
  def num_layers(self) -> int:
    return self.pre.config.num_layers

  def bucket_sizes(self) -> dict[int, int]:
    """Returns how many prompts fall in each bucket."""
    sizes: dict[int, int] = {}
    for b in self.batches:
      n = int((b["index"] >= 0).sum())
      sizes[b["input_ids"].shape[1]] = sizes.get(b["input_ids"].shape[1], 0) + n
    return sizes

  def main_bucket(self) -> int:
    sizes = self.bucket_sizes()
    return max(sizes, key=sizes.get)


def load_t5(model: str, dtype: str = "float32") -> tuple[models.Pretrained, Any]:
  """Returns a T5 (HF weights) and its tokenizer, or raises ValueError for another family."""
  import transformers
  model_dir = checkpoints.resolve_model_dir(model)
  hf_config = checkpoints.read_config(model_dir)
  if hf_config.get("model_type") != "t5":
    raise ValueError(f"the few-shot harness runs encoder-decoder T5 models; {model!r} has "
                     f"model_type {hf_config.get('model_type')!r}. Pass "
                     f"--config.model=google/flan-t5-base or a local T5 directory")
  module, cfg, dummy = models.build(hf_config, "seq2seq", dtype=dtype)
  # Every T5 parameter comes from the checkpoint, so load onto abstract shapes:
  # compiling ``module.init`` would take minutes for Flan-T5-base on a small CPU.
  abstract = jax.eval_shape(lambda: models.init_params(module, dummy))
  tensors, fmt = checkpoints.read_weights(model_dir)
  params, report = models.load_tensors(abstract, hf_config, tensors, fmt)
  if report.missing:
    raise checkpoints.CheckpointError(f"{model!r} lacks T5 parameters {report.missing[:5]} "
                                      f"({len(report.missing)} in all)")
  pre = models.Pretrained(module, jax.device_put(params), cfg, hf_config, model_dir, report)
  return pre, transformers.AutoTokenizer.from_pretrained(str(model_dir))


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
  return Harness(pre, tokenizer, bench, prompts, batches, int(new_tokens))


def resolve_profile(h: Harness, spec: str, num_batches: int, degree: int
                    ) -> tuple[tuple[float, ...], schedule.Profile | None]:
  """Returns ``(EP, measured Profile or None)`` for 'flat', 'acc' or 'v1,v2,...'."""
  if spec == "flat":
    return schedule.flat_profile(h.num_layers), None
  if spec != "acc":
    try:
      values = [float(v) for v in spec.split(",")]
    except ValueError:
      raise ValueError(f"--config.profile must be flat, acc or {h.num_layers} comma-separated "
                       f"values in (0, 1], got {spec!r}") from None
    return schedule.validate_profile(values, h.num_layers), None
  encode = jax.jit(lambda p, i, m: h.pre.module.apply(
      {"params": p}, i, m, output_scores=True, method=t5.T5ForConditionalGeneration.encode)["acc"])
  total, count = 0.0, 0
  for b in h.batches[:max(1, num_batches)]:  # no elimination while measuring
    acc_BxL = np.asarray(encode(h.pre.params, b["input_ids"], b["attention_mask"]))
    total, count = total + acc_BxL[b["index"] >= 0].sum(0), count + int((b["index"] >= 0).sum())
  prof = schedule.profile_from_acc(total / count, degree)
  return prof.ep, prof


def generate(h: Harness, batch: dict, counts: tuple[int, ...]) -> jax.Array:
  """Returns the greedy tokens [B, max_new_tokens] of one batch with encoder keep counts ``counts``."""
  fn = t5_generate.generate_fn(h.pre.module, counts, h.max_new_tokens)
  return fn(h.pre.params, batch["input_ids"], batch["attention_mask"])[0]


def predict(h: Harness, schedules: dict[int, tuple[int, ...]]) -> list[str]:
  """Returns the decoded generation of every prompt, in item order."""
  out = [""] * len(h.bench.items)
  for b in h.batches:
    tokens = np.asarray(generate(h, b, schedules[b["input_ids"].shape[1]]))
    for row, text in zip(b["index"], h.tokenizer.batch_decode(tokens, skip_special_tokens=True)):
      if row >= 0:
        out[row] = text
  return out


def score(items: Sequence[fs.Item], generations: Sequence[str]) -> dict:
  """Returns the exact-match score over all items, the mean over tasks, and per task."""
  preds = [fs.extract_answer(g, bool(it.query.choices)) for it, g in zip(items, generations)]
  hits = fs.exact_match(preds, [it.query.target for it in items])
  tasks = [it.task for it in items]
  per_task = {t: float(hits[[x == t for x in tasks]].mean()) for t in dict.fromkeys(tasks)}
  return {"score": float(hits.mean()), "correct": int(hits.sum()), "num_items": len(items),
          "macro_score": float(np.mean(list(per_task.values()))), "per_task": per_task,
          "answers": preds}


def time_schedules(h: Harness, counts_list: Sequence[tuple[int, ...]], repeats: int) -> dict:
  """Returns per keep counts: XLA FLOPs, encoder ms and generation ms of one main-bucket batch.

  Every schedule (the no-elimination baseline among them), encoder and
  generation alike, is timed in one interleaved group, so load drift on a
  shared machine hits them all alike.
  """
  main = h.main_bucket()
  batch = next(b for b in h.batches if b["input_ids"].shape[1] == main)
  args = (h.pre.params, jax.device_put(batch["input_ids"]), jax.device_put(batch["attention_mask"]))
  encode = t5.T5ForConditionalGeneration.encode
  fns, out = {}, {}
  for counts in dict.fromkeys(counts_list):
    fn = jax.jit(lambda p, i, m, c=counts: h.pre.module.apply(
        {"params": p}, i, m, c, method=encode)["last_hidden_state"])
    exe = fn.lower(*args).compile()
    gen = t5_generate.generate_fn(h.pre.module, counts, h.max_new_tokens)
    out[counts] = {"xla_flops": timing.compiled_flops(exe)}
    fns[("encoder_ms", counts)] = lambda exe=exe: exe(*args)
    fns[("generate_ms", counts)] = lambda gen=gen: gen(*args)[0]
  med = timing.interleaved_medians({str(key): f for key, f in fns.items()}, repeats=repeats,
                                   warmup=1)
  for name, counts in fns:
    out[counts][name] = 1e3 * med[str((name, counts))]
  return out


def dataset_expected_speedup(sizes: dict[int, int], schedules: dict[int, tuple[int, ...]]) -> float:
  """Returns eq. 7 over all prompts: full encoder cost over eliminated cost, every bucket."""
  full = sum(n * len(schedules[b]) * b for b, n in sizes.items())
  cut = sum(n * sum(schedule.effective_lengths(b, schedules[b])) for b, n in sizes.items())
  return full / cut


def sweep(h: Harness, coeffs: Sequence[float], ep: Sequence[float], repeats: int) -> list[dict]:
  """Returns one result row per k: score, keep counts, expected/FLOPs/measured speedups, latency."""
  sizes, main = h.bucket_sizes(), h.main_bucket()
  plans = [(k, {b: schedule.keep_counts(b, k, ep) for b in sizes}) for k in coeffs]
  base = schedule.keep_counts(main, 1.0, schedule.flat_profile(h.num_layers))
  timed = time_schedules(h, [base] + [s[main] for _, s in plans], repeats)
  rows = []
  for k, scheds in plans:
    t0 = time.perf_counter()
    generations = predict(h, scheds)
    row = {"coeff": k, **score(h.bench.items, generations), "generations": generations,
           "eval_seconds": time.perf_counter() - t0}
    c, t = scheds[main], timed[scheds[main]]
    row.update({
        "main_bucket": main, "keep_counts": list(c),
        "keep_counts_by_bucket": {str(b): list(s) for b, s in sorted(scheds.items())},
        "expected_speedup": schedule.expected_speedup(main, c),
        "expected_speedup_all_buckets": dataset_expected_speedup(sizes, scheds),
        "xla_flops": t["xla_flops"], "flops_ratio": timed[base]["xla_flops"] / t["xla_flops"],
        "encoder_ms": t["encoder_ms"], "measured_speedup": timed[base]["encoder_ms"] / t["encoder_ms"],
        "generate_ms": t["generate_ms"],
        "generate_speedup": timed[base]["generate_ms"] / t["generate_ms"]})
    rows.append(row)
  return rows


def format_table(result: dict) -> str:
  """Returns the sweep as a Markdown table."""
  lines = [f"{result['benchmark']}: {result['num_items']} items, {result['model']}, "
           f"{result['device']}; main bucket {result['main_bucket']}, batch {result['batch_size']}",
           "", "| k | score | keep counts (main bucket) | expected S (eq. 7) | FLOPs ratio "
           "| measured encoder speedup | encoder ms | generate ms |", "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    c = r["keep_counts"]
    lines.append(f"| {r['coeff']:g} | {100 * r['score']:.2f} | {c[0]} … {c[-1]} | "
                 f"{r['expected_speedup']:.2f}x | {r['flops_ratio']:.2f}x | "
                 f"{r['measured_speedup']:.2f}x | {r['encoder_ms']:.1f} | {r['generate_ms']:.1f} |")
  return "\n".join(lines)


def output_dir(config, out: str = "") -> Path:
  """Returns where results go: ``--out``, else ``config.workdir``, else workdirs/<config name>."""
  return Path(out or config.get("workdir") or Path("workdirs") / config.get("name", config.benchmark))


def evaluate_config(config, coeffs: Sequence[float] | None = None, out: str = "",
                    time_repeats: int = 0) -> dict:
  """Returns the results of a training-free few-shot sweep, printing the table and writing JSON.

  The data is read before the model loads, so a missing file or an offline hub
  fails at once.
  """
  coeffs = [schedule.validate_coeff(k) for k in (coeffs or config.coeffs)]
  bench = fs.load_benchmark(config)
  if not bench.items:
    raise ValueError(f"no {config.benchmark} items to evaluate ({bench.protocol})")
  out_dir = output_dir(config, out)
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f"{bench.name}: {bench.protocol}")
  pre, tokenizer = load_t5(config.model, config.dtype)
  h = build(config, bench, pre, tokenizer)
  ep, prof = resolve_profile(h, config.profile, config.profile_batches, config.profile_degree)
  rows = sweep(h, coeffs, ep, time_repeats or config.time_repeats)
  result = {
      "benchmark": bench.name, "model": str(config.model), "device": timing.device_name(),
      "jax_version": jax.__version__, "source": bench.source, "protocol": bench.protocol,
      "num_items": len(bench.items), "num_shots": int(config.num_shots),
      "mean_shots_used": float(np.mean(h.prompts.shots_used)),
      "prompts_with_fewer_shots": int(sum(n < min(config.num_shots, len(it.shots))
                                          for n, it in zip(h.prompts.shots_used, bench.items))),
      "prompts_truncated": h.prompts.num_truncated, "max_len": int(config.max_len),
      "bucket_sizes": {str(b): n for b, n in sorted(h.bucket_sizes().items())},
      "main_bucket": h.main_bucket(), "batch_size": int(config.batch_size),
      "max_new_tokens": h.max_new_tokens, "profile_spec": config.profile, "profile": list(ep),
      "measured_profile": prof.to_json() if prof else None,
      "timing": "encoder_ms, generate_ms: one batch of real prompts of the main bucket, medians "
                "of interleaved runs, baseline = no elimination (k = 1, flat profile); "
                "eval_seconds: wall time to score every prompt, compiles included",
      "config": config.to_dict(),
      "rows": [{k: v for k, v in r.items() if k not in ("answers", "generations")} for r in rows]}
  write_results(out_dir, result, bench, h.prompts, rows,
                {"generation": "generations", "answer": "answers"})
  print(format_table(result))
  return result


def write_results(out_dir: Path, result: dict, bench, prompts, rows: Sequence[dict],
                  per_item: dict[str, str]) -> None:
  """Writes the results JSON and one predictions line per item (``per_item``: out key -> row key)."""
  wd.write_json(out_dir / RESULTS, result)
  with open(out_dir / PREDICTIONS, "w") as f:
    for i, it in enumerate(bench.items):
      f.write(json.dumps({"task": it.task, "target": it.query.target,
                          "shots": prompts.shots_used[i],
                          "prompt_tokens": len(prompts.encoded.input_ids[i]),
                          "by_coeff": {f"{r['coeff']:g}": {k: r[v][i] for k, v in per_item.items()}
                                       for r in rows}}) + "\n")
  print(f"wrote {out_dir / RESULTS} and {out_dir / PREDICTIONS}")
