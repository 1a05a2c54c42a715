"""The one eliminating stack: every family's layers run through ``run``.

A family supplies its layers, each with two methods:

* ``attend(h_BxNxD, carry, queries, deterministic) -> (ctx_BxNxF, column sums, kv or None)``:
  the attention over all ``N_{l-1}`` word-vectors, heads concatenated,
  accumulating ``elimination.column_sums`` for each named query weighting in
  ``queries``;
* ``finish(h_BxKxD, ctx_BxKxF, deterministic) -> h_BxKxD``: everything after
  the Eliminate point (output projection, residual, norms, feed-forward).

Between the two, ``run`` scores the word-vectors, ranks them by the survivor
rule and keeps the ``N_l`` best (Sort+Eliminate, METHOD section 4), gathering
the context, the residual stream and every array in ``carry`` (validity,
original positions, protection levels, RoPE position ids) with the same indices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax

from latadj_jax.core import elimination
from latadj_jax.models.interface import Options


class Layers(nn.Module):
  """A scope holding ``count`` layers named "0", "1", ... (HF's ``encoder/layer``, ``model/layers``)."""
  layer: type           # a layer module class, built as ``layer(config, index)``
  config: Any
  count: int

  def setup(self):
    self.layers = [self.layer(self.config, i, name=str(i)) for i in range(self.count)]


@dataclasses.dataclass(frozen=True)
class Survivors:
  """How a stack picks survivors: the rule, and eq. 8's causal scoring for decoders."""
  rule: str = "score"          # elimination.CAUSAL_RULES (an encoder: SURVIVOR_RULES)
  causal: bool = False
  window: int = 0              # rule "window": score by the last this many queries
  pool: int = 0                # max-pool the scores over this many neighbours
  selection: str = "gather"    # "gather" or "onehot"

  @classmethod
  def of(cls, config: Any, causal: bool) -> "Survivors":
    """Returns the survivor settings held in a family's config."""
    return cls(config.survivors, causal, getattr(config, "score_window", 0),
               getattr(config, "score_pool", 0), config.selection)


def run(layers: Sequence[Any], h_BxNxD: jax.Array, carry: dict, keep_counts: Sequence[int],
        survivors: Survivors, options: Options, rng: jax.Array | None = None
        ) -> tuple[jax.Array, dict, dict]:
  """Returns (h_BxKxD, carry at the survivors, aux) after every layer.

  ``aux`` holds per-layer lists: ``positions`` (original positions after each
  layer), and on request ``scores`` and ``acc`` (``options.scores``), ``kv``
  (``options.kv``) and ``hidden`` (``options.hidden``: the input, then every
  layer's output). ``rng`` draws the ``random`` rule's survivors in training.
  """
  deterministic = not options.train
  aux = {"positions": [], "scores": [], "acc": [], "kv": [], "hidden": [h_BxNxD]}
  for layer, n_keep in zip(layers, keep_counts):
    valid = carry["valid"]
    eliminating = n_keep < valid.shape[1]
    queries = elimination.score_queries(survivors.rule, valid, survivors.window, options.scores,
                                        eliminating)
    ctx_BxNxF, sums, kv = layer.attend(h_BxNxD, carry, queries, deterministic)
    if eliminating:
      with jax.named_scope("select"):
        rank_BxN = elimination.ranking(survivors.rule, sums, valid, carry["positions"],
                                       causal=survivors.causal, window=survivors.window,
                                       pool=survivors.pool, rng=rng)
        names = sorted(carry)
        _, ctx_BxNxF, h_BxNxD, *kept = elimination.eliminate(
            rank_BxN, valid, carry["protect"], n_keep, ctx_BxNxF, h_BxNxD,
            *(carry[n] for n in names), method=survivors.selection)
        carry = dict(zip(names, kept))
    h_BxNxD = layer.finish(h_BxNxD, ctx_BxNxF, deterministic)
    aux["positions"].append(carry["positions"])
    if options.kv:
      aux["kv"].append(kv)
    if options.hidden:
      aux["hidden"].append(h_BxNxD)
    if options.scores:
      sv_BxN = elimination.finish_scores(sums["score"], valid, causal=survivors.causal)
      aux["scores"].append(sv_BxN)
      aux["acc"].append(elimination.acc(sv_BxN, valid))
  return h_BxNxD, carry, aux
