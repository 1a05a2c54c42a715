"""Where the time of one forward goes: per layer, attention / scores / selection / dense / other.

Traces a compiled forward with ``jax.profiler`` and sums the time of each
XLA:CPU thunk (fusions, dots, sorts, gathers) by the layer and the named scope
it came from. The categories, from the op names the models give:
``scores`` (the score vector's column sums, ``elimination.column_sums``),
``select`` (eq. 8's divisor, ranking, top-k and the gathers of Sort+Eliminate),
``attention`` (logits, softmax and context: the ``attend`` scope of
``attention.query_blocked`` and BERT's attention; its ``scores`` counted
apart), ``dense`` (every other dot, projections and MLP, with whatever
elementwise work XLA fused into it) and ``other`` (the rest: norms,
activations, residuals, layout). Thunk times are summed over
XLA's threads, so they can exceed the wall time on 2 cores.

    python benchmarks/layer_breakdown.py --family gpt2 --seq_len 1024 --ks 1.0,0.9,0.8
    python benchmarks/layer_breakdown.py --family bert --seq_len 512 --attention_block 64
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import elimination, schedule
from latadj_jax.models import stack
from latadj_jax.runtime import timing

CATEGORIES = ("attention", "scores", "select", "dense", "other")
_LAYER = re.compile(r"/layer_(\d+)/")


@contextlib.contextmanager
def layer_scopes():
  """Traces layer ``i``'s ops, its Sort+Eliminate included, under the named scope ``layer_i``.

  ``stack.run`` selects between a layer's ``attend`` and ``finish``, outside
  the layer's module, and T5's blocks name no index in their scope; so each
  layer's two halves and the ``elimination.ranking`` and ``eliminate`` calls
  between them are wrapped here. The compiled program is unchanged.
  """
  run, ranking, eliminate = stack.run, elimination.ranking, elimination.eliminate
  current = [0]

  class Scoped:
    def __init__(self, layer, i):
      self.layer, self.i = layer, i

    def attend(self, *args):
      current[0] = self.i
      with jax.named_scope(f"layer_{self.i}"):
        return self.layer.attend(*args)

    def finish(self, *args):
      with jax.named_scope(f"layer_{self.i}"):
        return self.layer.finish(*args)

  def in_layer(fn):
    def scoped(*args, **kwargs):
      with jax.named_scope(f"layer_{current[0]}"):
        return fn(*args, **kwargs)
    return scoped

  def scoped_run(layers, *args, **kwargs):
    return run([Scoped(layer, i) for i, layer in enumerate(layers)], *args, **kwargs)

  with mock.patch.object(stack, "run", scoped_run), \
       mock.patch.object(elimination, "ranking", in_layer(ranking)), \
       mock.patch.object(elimination, "eliminate", in_layer(eliminate)):
    yield


def category(op_name: str, opcode_text: str) -> str:
  """Returns the category of one HLO instruction from its op name (named scopes) and text."""
  if "/select/" in op_name or op_name.endswith("/select"):
    return "select"
  if "/scores/" in op_name:
    return "scores"
  if "/attend/" in op_name:
    return "attention"
  if "dot_general" in op_name or " dot(" in opcode_text or "__ynn_fusion" in opcode_text:
    return "dense"
  return "other"


def instruction_table(hlo_text: str) -> dict[str, tuple[int | None, str]]:
  """Returns {instruction name: (layer or None, category)} for the entry computation's thunks."""
  table = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*", line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    op_name = op.group(1) if op else ""
    layer = _LAYER.search(op_name)
    table[m.group(1)] = (int(layer.group(1)) if layer else None, category(op_name, line))
  return table


def breakdown(fn, args, rounds: int = 3, jit_kwargs: dict | None = None) -> dict:
  """Returns wall ms and per-layer, per-category thunk ms (means over ``rounds`` traced calls)."""
  compiled = jax.jit(fn, **(jit_kwargs or {})).lower(*args).compile()
  table = instruction_table(compiled.as_text())
  for _ in range(2):
    timing.block(compiled(*args))
  t0 = time.perf_counter()
  for _ in range(rounds):
    timing.block(compiled(*args))
  wall_ms = (time.perf_counter() - t0) / rounds * 1e3
  from jax.profiler import ProfileData
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(rounds):
        timing.block(compiled(*args))
    data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  ms = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in table:
          layer, cat = table[ev.name]
          ms[(layer, cat)] += ev.duration_ns / 1e6 / rounds
  layers = sorted({lay for lay, _ in ms if lay is not None})
  per_layer = [{c: ms.get((lay, c), 0.0) for c in CATEGORIES} for lay in layers]
  outside = {c: ms.get((None, c), 0.0) for c in CATEGORIES}
  totals = {c: sum(r[c] for r in per_layer) + outside[c] for c in CATEGORIES}
  return {"wall_ms": wall_ms, "thunk_ms": sum(totals.values()), "totals_ms": totals,
          "outside_layers_ms": outside, "per_layer_ms": per_layer,
          "xla_flops": timing.compiled_flops(compiled)}


def build(args):
  """Returns (forward(counts) -> f(params, ids, mask), params, ids, mask, n_layers, jit kwargs).

  The jit kwargs are the model's own compiler options (``Model.jit_options``).
  """
  rng = np.random.default_rng(0)
  B, N = args.batch, args.seq_len
  if args.family == "gpt2":  # GPT-2 small
    model = models.build({"model_type": "gpt2", "n_positions": max(N, 1024)},
                         attention_block=args.attention_block)
    method = "prefill"
  elif args.family == "llama":  # SmolLM2-135M's shape
    model = models.build({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                          "intermediate_size": 1536, "num_hidden_layers": 30,
                          "num_attention_heads": 9, "num_key_value_heads": 3,
                          "max_position_embeddings": max(N, 2048), "rope_theta": 100000.0,
                          "tie_word_embeddings": True},
                         survivors="last", keep_sinks=4, attention_block=args.attention_block)
    method = "prefill"
  elif args.family == "t5":  # Flan-T5-base's encoder
    model = models.build({"model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64,
                          "d_ff": 2048, "num_layers": 12, "num_heads": 12,
                          "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
                         attention_block=args.attention_block)
    method = "encode"
  elif args.family == "bert":  # BERT-base, classification logits
    model = models.build({"model_type": "bert", "max_position_embeddings": max(N, 512)},
                         attention_block=args.attention_block)
    method = None
  else:
    raise ValueError(f"unknown family {args.family!r}: gpt2, llama, t5 or bert")
  ids = jnp.asarray(rng.integers(5, model.vocab_size, (B, N)), jnp.int32)
  mask = jnp.ones((B, N), jnp.int32)
  params = jax.device_put(model.init(0))

  def forward(counts):
    def f(p, i, m):
      with layer_scopes():
        batch = models.Batch(i, m)
        if method is None:
          return model.apply(p, batch, counts).logits
        out = model.method(method, p, batch, counts)
      return out[0] if isinstance(out, tuple) else out.last_hidden_state
    return f
  return forward, params, ids, mask, model.num_layers, model.jit_options()


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--family", default="gpt2", choices=["gpt2", "llama", "t5", "bert"])
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--ks", default="1.0,0.9,0.8")
  p.add_argument("--attention_block", type=int, default=0, help="0: all queries at once")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default="", help="JSON file to write (default: print only)")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  forward, params, ids, mask, L, jit_kwargs = build(args)
  rows = []
  for k in [float(x) for x in args.ks.split(",")]:
    counts = schedule.keep_counts(args.seq_len, k, schedule.flat_profile(L))
    r = breakdown(forward(counts), (params, ids, mask), args.rounds, jit_kwargs)
    r.update(k=k, keep_counts=list(counts))
    rows.append(r)
    t = r["totals_ms"]
    print(f"k={k}: wall {r['wall_ms']:.0f} ms, thunks {r['thunk_ms']:.0f} ms: "
          + ", ".join(f"{c} {t[c]:.0f} ({100 * t[c] / r['thunk_ms']:.0f}%)" for c in CATEGORIES),
          file=sys.stderr)
  result = {"benchmark": "layer_breakdown", "command": "python " + " ".join(sys.argv),
            "device": timing.device_name(), "jax_version": jax.__version__,
            "settings": vars(args), "rows": rows}
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  for r in rows:
    print(f"\nk = {r['k']}  (wall {r['wall_ms']:.0f} ms)\n| layer | N in → out | "
          + " | ".join(CATEGORIES) + " |\n|---|---|" + "---|" * len(CATEGORIES))
    n_in = args.seq_len
    for i, lay in enumerate(r["per_layer_ms"]):
      n_out = r["keep_counts"][i]
      print(f"| {i} | {n_in} → {n_out} | " + " | ".join(f"{lay[c]:.1f}" for c in CATEGORIES) + " |")
      n_in = n_out


if __name__ == "__main__":
  main()
