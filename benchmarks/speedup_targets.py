"""Ask for a speedup or a latency budget on a trained workdir: the k chosen, speedups and accuracy.

For each expected-speedup target (paper eq. 7) every bucket gets the largest k
whose schedule reaches it; the script reports the k chosen per bucket, the
expected speedup (main bucket and over the whole split), the XLA FLOPs ratio,
the measured speedup of the main bucket against no elimination, and the dev
metrics. It then calibrates this device (a grid of schedules per bucket, as
``eval.py --calibrate`` does) and sets a latency budget of half the calibrated
k = 1 latency of the main bucket: per bucket the least elimination that fits,
whether the budget is met, and the metrics.

    python benchmarks/speedup_targets.py --workdir=DIR     # writes benchmarks/results/speedup_targets.json
    python benchmarks/speedup_targets.py --workdir=DIR --targets 1.5,2 --repeats 2 \\
        --calibrate_points 4 --out /tmp/speedup_targets.json                         # quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latadj_jax.core import schedule
from latadj_jax.data import splits
from latadj_jax.runtime import timing, xla_cache
from latadj_jax.runtime.executables import ExecutableCache
from latadj_jax.tuning import offline, sweep, targets


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a training workdir (train.py --workdir)")
  p.add_argument("--targets", default="1.5,2,2.5,3", help="comma-separated expected speedups")
  p.add_argument("--budget_fraction", type=float, default=0.5,
                 help="latency budget as a fraction of the calibrated k = 1 latency")
  p.add_argument("--split", default="validation")
  p.add_argument("--batch_size", type=int, default=0, help="default: the run's eval_batch_size")
  p.add_argument("--max_examples", type=int, default=0)
  p.add_argument("--repeats", type=int, default=10, help="timed rounds per measurement (median)")
  p.add_argument("--calibrate_points", type=int, default=12, help="schedules per bucket to time")
  p.add_argument("--cache_dir", default="", help="persistent compilation cache (default WORKDIR/xla_cache)")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "speedup_targets.json"))
  return p.parse_args(argv)


def summary(row: dict, metric: str) -> str:
  """Returns one line: per-bucket k, expected and measured speedup, and the main metric."""
  ks = ", ".join(f"{b}: k={c['k']:.4g}" for b, c in row["choices"].items())
  return (f"{ks} | expected {row['expected_speedup']:.2f}x (all buckets "
          f"{row['expected_speedup_all_buckets']:.2f}x) | FLOPs {row['flops_ratio']:.2f}x | "
          f"measured {row['measured_speedup']:.2f}x, {row['latency_ms']:.2f} ms | "
          f"{metric} {100 * row.get(metric, float('nan')):.2f}")


def run(args: argparse.Namespace) -> dict:
  """Returns the results: one row per speedup target, then the latency budget."""
  wanted = [targets.validate_speedup(t) for t in args.targets.split(",") if t.strip()]
  xla_cache.setup_compilation_cache(args.cache_dir or Path(args.workdir) / "xla_cache")
  r, ep = offline.prepare(args.workdir, args.batch_size, "")
  (enc,) = splits.load_encoded_split(r.run.config, r.task, r.tokenizer, args.split,
                                        args.max_examples)
  cache = ExecutableCache()
  metric = r.task.main_metric
  print(f"{r.run.workdir} (step {r.step}), {args.split}: {len(enc)} examples, "
        f"batch {r.run.config.eval_batch_size}, {timing.device_name()}")

  rows = []
  for t in wanted:
    choices = targets.for_speedup(r.buckets, ep, t, strict=False)
    row = offline.evaluate_choices(r, choices, enc, time_repeats=args.repeats, cache=cache)
    rows.append({"target_speedup": t, "met": all(c.met for c in choices.values()), **row})
    print(f"target {t:g}x: {summary(row, metric)}")

  clf = offline.classifier(r, enc, cache)
  main = sweep.main_bucket(clf.bucket_sizes())
  table = targets.calibrate(clf, ep, int(r.run.hf_config["vocab_size"]), args.calibrate_points,
                            args.repeats)
  targets.save_calibration(r.run.workdir, table)
  at_one = list(schedule.keep_counts(main, 1.0, ep))
  k1_ms = next(e["latency_ms"] for e in table["buckets"][str(main)] if e["counts"] == at_one)
  budget = args.budget_fraction * k1_ms
  choices = targets.for_budget(table, r.buckets, budget, strict=False)
  row = offline.evaluate_choices(r, choices, enc, time_repeats=args.repeats, cache=cache)
  met = all(c.met for c in choices.values())
  budget_row = {"budget_ms": budget, "k1_latency_ms": k1_ms, "met": met,
                "met_when_remeasured": row["latency_ms"] <= budget, **row}
  print(f"latency budget {budget:.3g} ms ({args.budget_fraction:g} x k=1's {k1_ms:.3g} ms): "
        f"{'met' if met else 'NOT met (no calibrated schedule fits)'} | {summary(row, metric)}")
  print(cache.stats)
  return {"workdir": str(r.run.workdir), "step": r.step, "task": r.task.name,
          "model": str(r.run.config.model), "device": timing.device_name(), "split": args.split,
          "examples": len(enc), "batch_size": r.run.config.eval_batch_size, "profile": list(ep),
          "repeats": args.repeats, "main_bucket": main, "speedup_targets": rows,
          "latency_budget": budget_row, "calibration": table}


def main(argv=None) -> int:
  args = parse_args(argv)
  results = run(args)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  from latadj_jax.runtime import cli
  cli.run(main, sys.argv[1:])
