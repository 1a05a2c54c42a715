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
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latadj_jax import models
from latadj_jax.data import pipeline, text
from latadj_jax.models import generate as gen
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.runtime.executables import ExecutableCache


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


def _nll_fn(model: models.Model, counts: tuple[int, ...]):
  def nll(params, input_ids, attention_mask, targets, weights):
    out = model.apply(params, models.Batch(input_ids, attention_mask), counts)
    nll_BxK, w_BxK = survivor_nll(out.logits, out.positions, out.mask, targets, weights)
    return jnp.sum(nll_BxK), jnp.sum(w_BxK)
  return nll


@dataclasses.dataclass
class LMEvaluator:
  """A causal LM ready to score held-out blocks at any keep-count schedule.

  It is the LM task's ``Evaluation`` for ``tuning.sweep``: survivor perplexity
  (and, with ``last_word``, last-word scores) at any schedules, and one eval
  batch (forward, LM head on the survivors and the NLL) to time.
  """
  model: models.Model
  params: Any
  encoded: text.LMEncoded
  batch_size: int
  model_id: str
  dtype: str = "float32"
  cache: ExecutableCache = dataclasses.field(default_factory=ExecutableCache)
  last_word: tuple[text.LastWord, tuple[int, ...]] | None = None  # passages and their buckets

  @property
  def block_size(self) -> int:
    return self.encoded.max_len

  @property
  def num_layers(self) -> int:
    return self.model.num_layers

  @property
  def metrics(self) -> dict[str, str]:
    lw = {"lambada_accuracy": "%", "lambada_perplexity": ".2f"} if self.last_word else {}
    return {"perplexity": ".3f", "fraction_scored": ".3f", **lw}

  def bucket_sizes(self) -> dict[int, int]:
    return {self.block_size: len(self.encoded.input_ids)}

  def score(self, schedules: Mapping[int, tuple[int, ...]]) -> dict[str, float]:
    """Returns the block perplexity (and last-word scores) at ``schedules`` (by length)."""
    out = self.perplexity(schedules[self.block_size])
    if self.last_word:
      lw, buckets = self.last_word
      s = last_word_scores(self.model, self.params, lw, schedules, self.batch_size, buckets)
      out.update(lambada_accuracy=s["accuracy"], lambada_perplexity=s["perplexity"],
                 lambada_examples=s["examples"])
    return out

  def timed(self, bucket: int, counts: tuple[int, ...]) -> dict[str, timing.Timed]:
    exe = self.executable(counts)
    args = (self.params,) + self.args(next(iter(self.batches())))
    return {"latency": timing.Timed(lambda: exe(*args), timing.compiled_flops(exe),
                                    self.batch_size * self.block_size, "tokens")}

  def executable(self, counts: tuple[int, ...]) -> jax.stages.Compiled:
    """Returns the compiled forward + survivor NLL for one schedule (shared by equal counts)."""
    key = ("lm", self.model_id, self.block_size, self.batch_size, tuple(counts), self.dtype)
    ids = jax.ShapeDtypeStruct((self.batch_size, self.block_size), jnp.int32)
    w = jax.ShapeDtypeStruct((self.batch_size, self.block_size), jnp.float32)
    return self.cache.get(key, lambda: jax.jit(_nll_fn(self.model, tuple(counts)),
                                               **self.model.jit_options()).lower(
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


def perplexity_at(config, model: models.Model, params, eval_enc: text.LMEncoded,
                  counts: tuple[int, ...]) -> dict[str, float]:
  """Returns the validation perplexity and fraction scored at one schedule (the training-time eval)."""
  ev = LMEvaluator(model, params, eval_enc, config.eval_batch_size, "train", config.dtype)
  out = ev.perplexity(counts)
  return {"perplexity": out["perplexity"], "fraction_scored": out["fraction_scored"]}


# --- LAMBADA-style last word --------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def last_word_fn(model: models.Model, counts: tuple[int, ...] | None, num_targets: int):
  """Returns a jitted ``fn(params, ids, mask, targets_BxT) -> (nll_BxT, argmax_BxT)``.

  The context is prefilled with ``counts``; target token ``t`` is scored from
  the logits after feeding targets ``0 .. t-1`` through the KV cache.
  """
  T = num_targets

  @functools.partial(jax.jit, **model.jit_options())
  def fn(params, input_ids, attention_mask, targets_BxT):
    logits_BxV, out = model.method("prefill", params, models.Batch(input_ids, attention_mask),
                                   counts)
    state = gen.prefill_state(out, attention_mask, T)
    offsets = [c["k"].shape[1] - T for c in state["caches"]]

    def step(caches, t):
      logits, caches = model.method("decode", params, targets_BxT[:, t], caches,
                                    [o + t for o in offsets], state["pos_B"] + t,
                                    state["pos_id_B"] + t)
      return caches, logits

    _, rest_TxBxV = jax.lax.scan(step, state["caches"], jnp.arange(T - 1))
    logits_BxTxV = jnp.concatenate([logits_BxV[:, None], jnp.swapaxes(rest_TxBxV, 0, 1)], axis=1)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return nll_BxT, jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
  return fn


def last_word_scores(model: models.Model, params, lw: text.LastWord,
                     schedules: Mapping[int, tuple[int, ...]], batch_size: int,
                     buckets: Sequence[int]) -> dict[str, float]:
  """Returns last-word accuracy and per-word perplexity, each bucket at its ``schedules`` counts."""
  T = max(len(t) for t in lw.targets)
  params = single_device(params)
  correct, word_nll, n = 0, 0.0, 0
  for batch in text.last_word_batches(lw, batch_size, buckets, T):
    counts = schedules[batch["input_ids"].shape[1]]
    nll_BxT, argmax_BxT = last_word_fn(model, counts, T)(params, batch["input_ids"],
                                                          batch["attention_mask"], batch["targets"])
    ok_BxT = np.asarray(argmax_BxT) == batch["targets"]
    real, tmask = batch["index"] >= 0, batch["target_mask"]
    nll_B = (np.asarray(nll_BxT, np.float64) * tmask).sum(-1)
    ok_B = (np.asarray(ok_BxT) | (tmask == 0)).all(-1)
    correct += int(ok_B[real].sum())
    word_nll += float(nll_B[real].sum())
    n += int(real.sum())
  return {"accuracy": correct / n, "perplexity": math.exp(word_nll / n), "examples": n}


def load_last_word(source: str, tokenizer, model: models.Model, config, max_examples: int = 0):
  """Returns (LastWord, buckets): passages tokenized with contexts that fit the model's positions."""
  texts = text.load_last_word_texts(source, max_examples)
  probe = text.encode_last_word(texts, tokenizer, 1 << 30)
  T = max(len(t) for t in probe.targets)
  max_context = min(config.block_size, model.max_positions - T)
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


# --- workdirs -----------------------------------------------------------------------
@dataclasses.dataclass
class RestoredLM:
  """A trained LM restored from its workdir, with its tokenizer and profile."""
  run: wd.Run
  model: models.Model
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
  """Returns the latest checkpoint of an LM workdir with its model and tokenizer."""
  import transformers
  run = wd.load_run(workdir)
  model = models.build(run.hf_config, "lm", run_config=run.config, dtype=run.config.dtype)
  params, step = wd.restore_params(run.workdir, model.abstract_params())
  params = single_device(params)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(run.workdir / wd.TOKENIZER))
  return RestoredLM(run, model, params, tokenizer, step)
