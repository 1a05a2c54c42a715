"""Measured speedup of elimination against eq. 7 and XLA's FLOPs ratio, across batch and length.

BERT-base shape, random weights, JAX only. For each (batch, length) it times,
interleaved in one process (median of rounds):

* ``base``: the model with no elimination (k = 1, flat profile);
* ``k=…``: Sort+Eliminate with the quickstart profile spread to 12 layers
  (as in ``compare_pytorch.py``), token selection by gather;
* ``k=… no-select``: the same keep counts with the selection cut out: no score
  vector, no top-k, no gather, each layer keeps its leading word-vectors by a
  slice. Its matmuls are those of ``k=…``, so the gap between the two is what
  the selection itself costs;
* ``k=… onehot``: the one-hot-matmul selection instead of the gather (at the
  ``--onehot_ks`` only).

Speedups are against ``base``. The FLOPs speedup is XLA's
``cost_analysis()['flops']`` of ``base`` over that of ``k=…``; eq. 7 is the
paper's ``S = L N0 / sum_l (0.25 N_{l-1} + 0.75 N_l)``. Writes the JSON, a
Markdown table and a PNG plot.

    python benchmarks/elimination_scaling.py             # 12 shapes (about 30 min on 2 cores)
    python benchmarks/elimination_scaling.py --quick     # batch 1, 8 at lengths 64, 128 (~4 min)
    python benchmarks/elimination_scaling.py --shapes 8x128,8x512 --ks 0.9
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import elimination, schedule
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd

sys.path.insert(0, str(Path(__file__).parent))
from compare_pytorch import QUICKSTART_EP, inputs, spread_profile  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--lengths", default="64,128,256,512")
  p.add_argument("--shapes", default="", help="BxN list such as 8x128,32x512 (overrides the grid)")
  p.add_argument("--ks", default="0.95,0.9,0.85,0.8")
  p.add_argument("--onehot_ks", default="0.9", help="ks also timed with one-hot selection")
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--min_rounds", type=int, default=3)
  p.add_argument("--seconds", type=float, default=45.0, help="time each shape at least this long")
  p.add_argument("--quick", action="store_true", help="batches 1,8, lengths 64,128, 10 s per shape")
  p.add_argument("--out", default=str(RESULTS / "elimination_scaling.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.batches, args.lengths, args.seconds = "1,8", "64,128", 10.0
  return args


def _keep_leading(sv_BxN, valid_BxN, protect_BxN, n_keep, *arrays_BxN_, method="gather"):
  """Stands in for ``elimination.eliminate``: keeps the first ``n_keep`` positions by a slice."""
  idx_BxK = jnp.broadcast_to(jnp.arange(n_keep), (valid_BxN.shape[0], n_keep))
  return (idx_BxK,) + tuple(a[:, :n_keep] for a in arrays_BxN_)


@contextlib.contextmanager
def selection_cut_out():
  """Traces BERT with no score vector, top-k or gather; the same keep counts (a benchmark control).

  ``stack.run`` asks ``score_queries`` which column sums the attention should
  accumulate (none, here), ranks with ``ranking`` and keeps with ``eliminate``.
  """
  zeros = lambda rule, colsums, valid, *a, **k: jnp.zeros(valid.shape, jnp.float32)
  with mock.patch.object(elimination, "eliminate", _keep_leading), \
       mock.patch.object(elimination, "score_queries", lambda *a, **k: {}), \
       mock.patch.object(elimination, "ranking", zeros):
    yield


def compile_forward(model, params, arrays, counts, select: bool = True):
  def forward(p, ids, mask):
    out = model.apply(p, models.Batch(ids, mask), counts)
    return out.last_hidden_state, out.pooled
  ctx = contextlib.nullcontext() if select else selection_cut_out()
  with ctx:
    return jax.jit(forward).lower(params, *arrays).compile()


def run_shape(args, by_selection, params, batch: int, length: int, ks, onehot_ks,
              profile) -> dict:
  """Returns one row: times, FLOPs and speedups of every variant at one (batch, length)."""
  L = args.layers
  arrays = inputs(batch, length, by_selection["gather"].vocab_size)[:2]
  variants = {"base": (by_selection["gather"], (length,) * L, True)}
  for k in ks:
    counts = schedule.keep_counts(length, k, profile)
    variants[f"k={k}"] = (by_selection["gather"], counts, True)
    variants[f"k={k} no-select"] = (by_selection["gather"], counts, False)
    if k in onehot_ks:
      variants[f"k={k} onehot"] = (by_selection["onehot"], counts, True)
  compiled, flops = {}, {}
  for name, (model, counts, select) in variants.items():
    compiled[name] = compile_forward(model, params, arrays, counts, select)
    flops[name] = timing.compiled_flops(compiled[name])
  fns = {name: (lambda c=c: c(params, *arrays)) for name, c in compiled.items()}
  load = os.getloadavg()[0]
  t0 = time.perf_counter()
  med = timing.interleaved_medians(fns, repeats=args.min_rounds, warmup=1, min_seconds=args.seconds)
  wall = time.perf_counter() - t0
  row = {"batch": batch, "length": length, "base_ms": 1e3 * med["base"],
         "base_flops": flops["base"], "load_avg_1min": [load, os.getloadavg()[0]],
         "timed_seconds": wall, "ks": []}
  for k in ks:
    name, counts = f"k={k}", variants[f"k={k}"][1]
    e = {"k": k, "keep_counts": list(counts), "ms": 1e3 * med[name],
         "expected_speedup": schedule.expected_speedup(length, counts),
         "flops_speedup": flops["base"] / flops[name],
         "measured_speedup": med["base"] / med[name],
         "no_select_ms": 1e3 * med[f"{name} no-select"],
         "no_select_speedup": med["base"] / med[f"{name} no-select"],
         "no_select_flops_speedup": flops["base"] / flops[f"{name} no-select"]}
    e["measured_over_flops"] = e["measured_speedup"] / e["flops_speedup"]
    e["selection_share"] = (med[name] - med[f"{name} no-select"]) / med[name]
    if f"{name} onehot" in med:
      e["onehot_ms"] = 1e3 * med[f"{name} onehot"]
      e["onehot_over_gather"] = med[f"{name} onehot"] / med[name]
    row["ks"].append(e)
  print(f"{batch}x{length}: base {row['base_ms']:.0f} ms; " + ", ".join(
      f"k={e['k']} {e['measured_speedup']:.2f}x/{e['flops_speedup']:.2f}x sel "
      f"{100 * e['selection_share']:.0f}%" for e in row["ks"]) + f"; load {load:.1f}",
      file=sys.stderr, flush=True)
  return row


def run(args: argparse.Namespace) -> dict:
  ks = [float(k) for k in args.ks.split(",")]
  onehot_ks = [float(k) for k in args.onehot_ks.split(",")] if args.onehot_ks else []
  by_selection = {m: models.build({"model_type": "bert", "num_hidden_layers": args.layers}, "none",
                                  selection=m) for m in ("gather", "onehot")}
  cfg = by_selection["gather"].config
  params = by_selection["gather"].init(0)
  profile = spread_profile(QUICKSTART_EP, args.layers)
  if args.shapes:
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
  else:
    shapes = [(b, n) for b in map(int, args.batches.split(",")) for n in map(int, args.lengths.split(","))]
  rows = [run_shape(args, by_selection, params, b, n, ks, onehot_ks, profile)
          for b, n in sorted(shapes, key=lambda bn: (bn[0] * bn[1], bn[1]))]
  return {
      "benchmark": "elimination_scaling",
      "command": "python " + " ".join(sys.argv),
      "device": timing.device_name(),
      "jax_version": jax.__version__,
      "settings": {"model": "BERT-base shape (BertModel with pooler), random weights",
                   "layers": cfg.num_hidden_layers, "dtype": cfg.dtype,
                   "profile": [round(e, 4) for e in profile],
                   "profile_source": "quickstart EP [0.739, 0.792, 0.832, 0.911, 1, 1] spread "
                                     "to 12 layers as two layers of sqrt(EP) each",
                   "selection": "gather (one-hot at onehot_ks)",
                   "timing": f"median of interleaved rounds: at least {args.min_rounds} rounds "
                             f"and {args.seconds:.0f} s per shape, after one warm-up round"},
      "rows": rows,
  }


def markdown(result: dict) -> str:
  """Returns the results as a Markdown table: one line per (batch, length, k)."""
  lines = [f"BERT-base, random weights, quickstart profile spread to 12 layers, {result['device']}. "
           "Speedups against the same model with no elimination.", "",
           "| batch | length | k | eq. 7 | XLA FLOPs | measured | measured / FLOPs "
           "| selection cost | one-hot / gather |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    for e in r["ks"]:
      oh = f"{e['onehot_over_gather']:.2f}" if "onehot_over_gather" in e else ""
      lines.append(f"| {r['batch']} | {r['length']} | {e['k']} | {e['expected_speedup']:.2f}x | "
                   f"{e['flops_speedup']:.2f}x | {e['measured_speedup']:.2f}x | "
                   f"{e['measured_over_flops']:.2f} | {100 * e['selection_share']:.1f}% | {oh} |")
  return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
  """Writes a PNG: speedups against length per batch (top) and the selection's share of time (bottom)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["rows"]
  batches = sorted({r["batch"] for r in rows})
  ks = [e["k"] for e in rows[0]["ks"]]
  colors = dict(zip(ks, plt.cm.viridis(np.linspace(0, 0.85, len(ks)))))
  fig, axes = plt.subplots(2, len(batches), figsize=(4.2 * len(batches), 7.5), squeeze=False,
                           sharex="col", gridspec_kw={"height_ratios": [2, 1]})
  for col, b in enumerate(batches):
    rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["length"])
    lengths = [r["length"] for r in rs]
    top, bottom = axes[0, col], axes[1, col]
    for i, k in enumerate(ks):
      get = lambda key: [next(e for e in r["ks"] if e["k"] == k)[key] for r in rs]
      c = colors[k]
      top.plot(lengths, get("measured_speedup"), "o-", color=c, label=f"k={k} measured")
      top.plot(lengths, get("flops_speedup"), "s--", color=c, alpha=0.7, label=f"k={k} XLA FLOPs")
      top.plot(lengths, get("expected_speedup"), ":", color=c, alpha=0.7, label=f"k={k} eq. 7")
      bottom.plot(lengths, [100 * v for v in get("selection_share")], "o-", color=c, label=f"k={k}")
    top.set_title(f"batch {b}")
    top.set_xscale("log", base=2)
    bottom.set_xticks(lengths, [str(n) for n in lengths])
    bottom.minorticks_off()
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    bottom.axhline(0, color="grey", lw=0.5)
    bottom.grid(alpha=0.3)
    bottom.set_xlabel("sequence length (tokens)")
    if col == 0:
      top.set_ylabel("speedup over no elimination (x)")
      bottom.set_ylabel("selection cost (% of latency)")
  axes[0, -1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.02, 1))
  axes[1, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
  fig.suptitle(f"BERT-base elimination: measured (solid), XLA FLOPs (dashed), eq. 7 (dotted); "
               f"{result['device']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  out = Path(args.out)
  wd.write_json(out, result)
  plot(result, out.with_suffix(".png"))
  print(markdown(result))
  print(f"\nwrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
  main()
