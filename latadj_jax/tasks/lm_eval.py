"""Language-model evaluation at any ``k``: survivor perplexity and LAMBADA-style last-word scores.

Perplexity. With elimination only the ``N_L`` positions that survive every
layer reach the LM head. The perplexity here is ``exp(mean NLL)`` over those
positions (a survivor at original position ``p`` predicts token ``p + 1``),
reported beside the fraction of target positions that were scored. Which
positions survive depends on later tokens (scores sum attention from later
queries), so at ``k < 1`` this is not a strict left-to-right perplexity and
must not be compared with one; at ``k = 1`` with a flat profile it is the
plain model's perplexity over every position.

Last word (LAMBADA-style). The context is prefilled with elimination, exactly
as generation does, and the last word's tokens are scored with the KV cache
under teacher forcing. This path is causal: the target never influences what
is eliminated. Accuracy counts a passage right when greedy decoding would
produce every token of the word; perplexity is ``exp`` of the mean per-word
NLL (lm-evaluation-harness's definition). ``continuation`` uses the same
path to score running text after a prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latadj_jax import models
from latadj_jax.core import elimination, schedule
from latadj_jax.data import pipeline, text
from latadj_jax.models import gpt2_generate as gen
from latadj_jax.models import llama
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.tuning import evaluate, report


# --- survivor perplexity ------------------------------------------------------------------------
def survivor_nll(logits_BxKxV: jax.Array, positions_BxK: jax.Array, mask_BxK: jax.Array,
                 targets_BxN: jax.Array, weights_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (nll_BxK, weight_BxK): each survivor's next-token NLL, and 1 where it is scored.

  ``targets_BxN[:, p]`` is the token after original position ``p``; a
  survivor is scored when it is a real token and its target exists
  (``weights_BxN[:, p] > 0``). The NLL is already multiplied by the weight.
  """
  tgt_BxK = jnp.take_along_axis(targets_BxN, positions_BxK, axis=1)
  w_BxK = jnp.take_along_axis(weights_BxN.astype(jnp.float32), positions_BxK, axis=1)
  w_BxK = w_BxK * mask_BxK.astype(jnp.float32)
  nll_BxK = optax.softmax_cross_entropy_with_integer_labels(logits_BxKxV.astype(jnp.float32),
                                                            tgt_BxK)
  return nll_BxK * w_BxK, w_BxK


def _nll_fn(module, counts: tuple[int, ...]):
  def nll(params, input_ids, attention_mask, targets, weights):
    out = module.apply({"params": params}, input_ids, attention_mask, keep_counts=counts)
    nll_BxK, w_BxK = survivor_nll(out["logits"], out["positions"], out["mask"], targets, weights)
    return jnp.sum(nll_BxK), jnp.sum(w_BxK)
  return nll


@dataclasses.dataclass
class LMEvaluator:
  """A causal LM ready to score held-out blocks at any keep-count schedule."""
  module: Any
  params: Any
  encoded: text.LMEncoded
  batch_size: int
  model_id: str
  dtype: str = "float32"
  cache: evaluate.ExecutableCache = dataclasses.field(default_factory=evaluate.ExecutableCache)

  @property
  def block_size(self) -> int:
    return self.encoded.max_len

  def executable(self, counts: tuple[int, ...]) -> jax.stages.Compiled:
    """Returns the compiled forward + survivor NLL for one schedule (shared by equal counts)."""
    key = ("lm", self.model_id, self.block_size, self.batch_size, tuple(counts), self.dtype)
    ids = jax.ShapeDtypeStruct((self.batch_size, self.block_size), jnp.int32)
    w = jax.ShapeDtypeStruct((self.batch_size, self.block_size), jnp.float32)
    return self.cache.get(key, lambda: jax.jit(_nll_fn(self.module, tuple(counts))).lower(
        self.params, ids, ids, ids, w))

  def batches(self):
    return text.lm_batches(self.encoded, self.batch_size, shuffle=False)

  @staticmethod
  def args(batch: dict) -> tuple:
    return (batch["input_ids"], batch["attention_mask"], batch["targets"], batch["target_weights"])

  def perplexity(self, counts: tuple[int, ...]) -> dict[str, float]:
    """Returns perplexity and mean NLL over the scored survivors, and the fraction scored."""
    exe = self.executable(counts)
    nll, scored = 0.0, 0.0
    for batch in self.batches():
      s, n = exe(self.params, *self.args(batch))
      nll, scored = nll + float(s), scored + float(n)
    total = self.encoded.num_targets
    mean = nll / max(scored, 1.0)
    return {"perplexity": math.exp(mean), "nll": mean, "fraction_scored": scored / total,
            "tokens_scored": int(scored), "tokens": int(total)}


def perplexity_at(config, module, params, eval_enc: text.LMEncoded,
                  counts: tuple[int, ...]) -> dict[str, float]:
  """Returns the validation perplexity and fraction scored at one schedule (the training-time eval)."""
  ev = LMEvaluator(module, params, eval_enc, config.eval_batch_size, "train", config.dtype)
  out = ev.perplexity(counts)
  return {"perplexity": out["perplexity"], "fraction_scored": out["fraction_scored"]}


def sweep(ev: LMEvaluator, coeffs: Sequence[float], profile: Sequence[float],
          time_repeats: int = 10) -> list[dict]:
  """Returns one row per ``k``: perplexity, fraction scored, schedule, expected/FLOPs/measured speedups.

  Latency is that of one eval batch (forward, LM head on the survivors and
  the NLL), interleaved with the no-elimination baseline.
  """
  n0 = ev.block_size
  base_exe = ev.executable(schedule.keep_counts(n0, 1.0, schedule.flat_profile(len(profile))))
  base_flops = timing.compiled_flops(base_exe)
  args = (ev.params,) + ev.args(next(iter(ev.batches())))
  rows = []
  for k in [schedule.validate_coeff(k) for k in coeffs]:
    counts = schedule.keep_counts(n0, k, profile)
    t0 = time.perf_counter()
    scores = ev.perplexity(counts)
    eval_seconds = time.perf_counter() - t0
    exe = ev.executable(counts)
    med = timing.interleaved_medians({"base": functools.partial(base_exe, *args),
                                      "elim": functools.partial(exe, *args)},
                                     repeats=time_repeats, warmup=1)
    rows.append({"coeff": k, **scores, "block_size": n0, "keep_counts": list(counts),
                 "expected_speedup": schedule.expected_speedup(n0, counts),
                 "flops_ratio": base_flops / timing.compiled_flops(exe),
                 "latency_ms": 1e3 * med["elim"], "baseline_latency_ms": 1e3 * med["base"],
                 "tokens_per_s": ev.batch_size * n0 / med["elim"],
                 "measured_speedup": med["base"] / med["elim"], "eval_seconds": eval_seconds})
  return rows


# --- LAMBADA-style last word --------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def last_word_fn(module, counts: tuple[int, ...] | None, num_targets: int):
  """Returns a jitted ``fn(params, ids, mask, targets_BxT) -> (nll_BxT, argmax_BxT)``.

  The context is prefilled with ``counts``; target token ``t`` is scored from
  the logits after feeding targets ``0 .. t-1`` through the KV cache. Any
  causal LM with GPT-2's ``prefill``/``decode`` methods works (GPT-2, Llama).
  """
  T, cls = num_targets, type(module)

  @functools.partial(jax.jit, **llama.jit_options(module))
  def fn(params, input_ids, attention_mask, targets_BxT):
    variables = {"params": params}
    logits_BxV, out = module.apply(variables, input_ids, attention_mask, counts,
                                   method=cls.prefill)
    caches = gen.init_caches(out["kv"], T)
    offsets = [c["k"].shape[1] - T for c in caches]
    last_BxK = elimination.last_valid_mask(out["mask"])
    pos_B = jnp.sum(jnp.where(last_BxK, out["positions"], 0), axis=-1) + 1
    pos_id_B = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)

    def step(caches, t):
      logits, caches = module.apply(variables, targets_BxT[:, t], caches, [o + t for o in offsets],
                                    pos_B + t, pos_id_B + t, method=cls.decode)
      return caches, logits

    _, rest_TxBxV = jax.lax.scan(step, caches, jnp.arange(T - 1))
    logits_BxTxV = jnp.concatenate([logits_BxV[:, None], jnp.swapaxes(rest_TxBxV, 0, 1)], axis=1)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return nll_BxT, jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
  return fn


def last_word_scores(module, params, lw: text.LastWord, coeff: float, profile: Sequence[float],
                     batch_size: int, buckets: Sequence[int]) -> dict[str, float]:
  """Returns last-word accuracy and per-word perplexity at ``coeff`` (each bucket its own counts)."""
  T = max(len(t) for t in lw.targets)
  params = single_device(params)
  correct, word_nll, n = 0, 0.0, 0
  for batch in text.last_word_batches(lw, batch_size, buckets, T):
    counts = schedule.keep_counts(batch["input_ids"].shape[1], coeff, profile)
    nll_BxT, argmax_BxT = last_word_fn(module, counts, T)(params, batch["input_ids"],
                                                          batch["attention_mask"], batch["targets"])
    ok_BxT = np.asarray(argmax_BxT) == batch["targets"]
    real, tmask = batch["index"] >= 0, batch["target_mask"]
    nll_B = (np.asarray(nll_BxT, np.float64) * tmask).sum(-1)
    ok_B = (np.asarray(ok_BxT) | (tmask == 0)).all(-1)
    correct += int(ok_B[real].sum())
    word_nll += float(nll_B[real].sum())
    n += int(real.sum())
  return {"accuracy": correct / n, "perplexity": math.exp(word_nll / n), "examples": n}


def load_last_word(source: str, tokenizer, module, config, max_examples: int = 0):
  """Returns (LastWord, buckets): passages tokenized with contexts that fit the model's positions."""
  texts = text.load_last_word_texts(source, max_examples)
  probe = text.encode_last_word(texts, tokenizer, 1 << 30)
  T = max(len(t) for t in probe.targets)
  max_context = min(config.block_size, module.config.n_positions - T)
  lw = text.encode_last_word(texts, tokenizer, max_context)
  longest = max(len(c) for c in lw.contexts)
  return lw, pipeline.make_buckets(longest, base=tuple(config.get("buckets", ())))


def single_device(params: Any) -> Any:
  """Returns ``params`` as fresh arrays on the default device, with no mesh attached.

  Training leaves them replicated on the ``'data'`` mesh (and orbax restores
  them so). Decoding then failed: the KV-cache update saw batch values
  sharded over that mesh's explicit ``'data'`` axis against unsharded caches,
  even after a ``device_put`` to one device, once the same process had run
  the survivor-perplexity forward. A copy through host memory drops the mesh.
  """
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)


# --- workdirs and reports -----------------------------------------------------------------------
@dataclasses.dataclass
class RestoredLM:
  """A trained LM restored from its workdir, with its tokenizer and profile."""
  run: wd.Run
  module: Any
  params: Any
  tokenizer: Any
  step: int


def load_tokenizer(pre: models.Pretrained, spec: str = "model"):
  """Returns the tokenizer of a pretrained LM: a GGUF file's own for ``spec="model"``, else
  ``text.load_tokenizer(spec, model dir)`` ("model", "byte", or a path/hub id)."""
  if pre.gguf_file is not None and spec == "model":
    from latadj_jax.models import gguf_loader
    return gguf_loader.load_tokenizer(pre.gguf_file)
  return text.load_tokenizer(spec, pre.model_dir)


def restore(workdir: str | Path) -> RestoredLM:
  """Returns the latest checkpoint of an LM workdir with its module and tokenizer."""
  import transformers
  run = wd.load_run(workdir)
  module, _, dummy = models.build(run.hf_config, "lm", dtype=run.config.dtype,
                                  **models.survivor_overrides(run.config))
  abstract = jax.eval_shape(lambda: models.init_params(module, dummy))
  params, step = wd.restore_params(run.workdir, abstract)
  params = single_device(params)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(run.workdir / wd.TOKENIZER))
  return RestoredLM(run, module, params, tokenizer, step)


def format_table(rows: Sequence[dict]) -> str:
  """Returns the sweep as a Markdown table."""
  has_lw = any("lambada_accuracy" in r for r in rows)
  head = ["coeff", "perplexity", "fraction scored"] + (["last-word acc", "last-word ppl"]
                                                       if has_lw else [])
  head += ["keep counts", "expected", "FLOPs ratio", "measured", "latency ms", "tok/s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"{r['coeff']:g}", f"{r['perplexity']:.3f}", f"{r['fraction_scored']:.3f}"]
    if has_lw:
      cells += [f"{100 * r['lambada_accuracy']:.2f}", f"{r['lambada_perplexity']:.2f}"]
    c = r["keep_counts"]
    cells += [f"{r['block_size']}: {c}", f"{r['expected_speedup']:.2f}x",
              f"{r['flops_ratio']:.2f}x", f"{r['measured_speedup']:.2f}x",
              f"{r['latency_ms']:.1f}", f"{r['tokens_per_s']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def sweep_and_report(config, module, params, eval_enc: text.LMEncoded, ep: Sequence[float],
                     workdir: Path, *, coeffs: Sequence[float] | None = None, model_id: str = "lm",
                     time_repeats: int | None = None, lambada: str = "", tokenizer=None,
                     max_lambada: int = 0, cache: evaluate.ExecutableCache | None = None) -> list[dict]:
  """Returns the sweep rows after printing the table and writing ``eval_results.{json,csv}``."""
  ev = LMEvaluator(module, params, eval_enc, config.eval_batch_size, model_id, config.dtype)
  if cache is not None:
    ev.cache = cache
  coeffs = list(coeffs if coeffs is not None else config.eval_coeffs)
  rows = sweep(ev, coeffs, ep, time_repeats or config.get("time_repeats", 10))
  if lambada:
    lw, buckets = load_last_word(lambada, tokenizer, module, config, max_lambada)
    for r in rows:
      s = last_word_scores(module, params, lw, r["coeff"], ep, config.eval_batch_size, buckets)
      r.update(lambada_accuracy=s["accuracy"], lambada_perplexity=s["perplexity"],
               lambada_examples=s["examples"])
  print(format_table(rows))
  print(ev.cache.stats)
  report.write_results(rows, Path(workdir), {
      "device": timing.device_name(), "task": "lm", "model": str(config.model or "scratch"),
      "data": str(config.data_dir or config.get("hub_dataset", "")), "lambada": lambada,
      "profile": list(ep), "cache": vars(ev.cache.stats),
      "perplexity": "exp(mean NLL) over the positions that reach the last layer; "
                    "fraction_scored is their share of all target positions"})
  return rows


def evaluate_workdir(workdir: str | Path, coeffs: Sequence[float], *, split: str = "validation",
                     batch_size: int = 0, max_examples: int = 0, profile: str = "",
                     time_repeats: int = 10, lambada: str = "",
                     cache: evaluate.ExecutableCache | None = None) -> list[dict]:
  """Returns the sweep rows of a trained LM workdir (``eval.py``'s LM path), printing and saving them.

  ``max_examples`` caps both the held-out blocks and the last-word passages;
  ``lambada`` defaults to the run config's.
  """
  r = restore(workdir)
  config = r.run.config
  with config.unlocked():
    if batch_size:
      config.eval_batch_size = batch_size
  ep = (schedule.parse_profile(profile, r.module.config.n_layer) if profile else r.run.profile)
  enc = text.load_blocks(config, r.tokenizer, split, max_examples)
  print(f"evaluating {r.run.workdir} (step {r.step}) on {split}: {enc.num_targets:,} target tokens")
  return sweep_and_report(config, r.module, r.params, enc, ep, r.run.workdir, coeffs=coeffs,
                          model_id=str(r.run.workdir), time_repeats=time_repeats,
                          lambada=lambada or config.get("lambada", ""), tokenizer=r.tokenizer,
                          max_lambada=max_examples, cache=cache)
