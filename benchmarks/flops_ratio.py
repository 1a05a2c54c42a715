"""Measured speedup against the XLA FLOPs ratio at batch 1 (issue 25, acceptance 1 and 2).

For each case (a model shape and a prompt length) it compiles the forward at
k = 1 and at each k with the flat profile, times them interleaved in one
process (median of rounds), and reports the measured speedup, the XLA FLOPs
speedup and their quotient (1.0: every saved FLOP became saved time). Then it
traces one k with ``layer_breakdown`` to give the share of the latency spent
on selection (the score vector's column sums, ranking, top-k and gathers).

The models are random-weight copies of the real shapes (the time of a forward
does not depend on the weights): SmolLM2-135M (time to first token: prompt
forward and the first token's logits), GPT-2 small (prefill), Flan-T5-base's
encoder and BERT-base (classification logits).

    python benchmarks/flops_ratio.py                      # all five cases (~10 min on 2 cores)
    python benchmarks/flops_ratio.py --cases bert:256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
import layer_breakdown  # noqa: E402  (a sibling benchmark script)

from latadj_jax.core import schedule  # noqa: E402
from latadj_jax.runtime import timing  # noqa: E402

CASES = "llama:1024,gpt2:1024,t5:512,bert:256,bert:512"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default=CASES, help="family:length, comma-separated")
  p.add_argument("--ks", default="0.9,0.8")
  p.add_argument("--repeats", type=int, default=15, help="timed rounds (median)")
  p.add_argument("--attention_block", type=int, default=0, help="0: all queries at once")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "flops_ratio.json"))
  return p.parse_args(argv)


def run_case(family: str, n: int, ks: list[float], args) -> dict:
  """Returns one case's rows: per k the FLOPs, medians, speedups and selection share."""
  spec = argparse.Namespace(family=family, seq_len=n, batch=1,
                            attention_block=args.attention_block)
  forward, params, ids, mask, L, jit_kwargs = layer_breakdown.build(spec)
  fns, rows = {}, []
  for k in [1.0] + ks:
    counts = schedule.keep_counts(n, k, schedule.flat_profile(L))
    compiled = jax.jit(forward(counts), **jit_kwargs).lower(params, ids, mask).compile()
    fns[k] = lambda c=compiled: c(params, ids, mask)
    rows.append({"k": k, "keep_counts": list(counts), "xla_flops": timing.compiled_flops(compiled),
                 "expected_speedup": schedule.expected_speedup(n, counts)})
  med = timing.interleaved_medians({str(k): f for k, f in fns.items()}, repeats=args.repeats)
  base = rows[0]
  for r in rows:
    r["ms"] = 1e3 * med[str(r["k"])]
    r["flops_speedup"] = base["xla_flops"] / r["xla_flops"]
    r["measured_speedup"] = med["1.0"] / med[str(r["k"])]
    r["measured_over_flops"] = r["measured_speedup"] / r["flops_speedup"]
    if r["k"] < 1.0:
      bd = layer_breakdown.breakdown(forward(tuple(r["keep_counts"])), (params, ids, mask),
                                     jit_kwargs=jit_kwargs)
      sel = bd["totals_ms"]["scores"] + bd["totals_ms"]["select"]
      r["selection_share"] = sel / bd["thunk_ms"]
      r["breakdown_totals_ms"] = bd["totals_ms"]
    print(f"{family}:{n} k={r['k']}: {r['ms']:.1f} ms, measured {r['measured_speedup']:.2f}x, "
          f"FLOPs {r['flops_speedup']:.2f}x, ratio {r['measured_over_flops']:.2f}"
          + (f", selection {100 * r['selection_share']:.1f}%" if "selection_share" in r else ""),
          file=sys.stderr)
  return {"family": family, "seq_len": n, "batch": 1, "rows": rows}


def main(argv=None) -> None:
  args = parse_args(argv)
  ks = [float(k) for k in args.ks.split(",")]
  cases = []
  for case in args.cases.split(","):
    family, n = case.split(":")
    cases.append(run_case(family, int(n), ks, args))
  result = {"benchmark": "flops_ratio", "command": "python " + " ".join(sys.argv),
            "device": timing.device_name(), "jax_version": jax.__version__,
            "settings": {"profile": "flat (R_l = k)", "dtype": "float32", "batch": 1,
                         "repeats": args.repeats, "attention_block": args.attention_block,
                         "weights": "random, real shapes",
                         "timing": "medians of interleaved rounds per case, k = 1 baseline"},
            "cases": cases}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print("| case | k | ms | measured | XLA FLOPs | measured / FLOPs | selection share |\n"
        "|---|---|---|---|---|---|---|")
  for c in cases:
    for r in c["rows"][1:]:
      print(f"| {c['family']} {c['seq_len']} | {r['k']} | {r['ms']:.0f} | "
            f"{r['measured_speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
            f"{r['measured_over_flops']:.2f} | {100 * r['selection_share']:.1f}% |")
  print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
