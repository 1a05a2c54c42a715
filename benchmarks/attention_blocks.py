"""Query-block size of the attention against latency: all queries at once (0) or blocks of B.

``attention.query_blocked`` runs the attention ``B`` queries at a time so that
the N x N probabilities are never written whole. On XLA:CPU that is a loop of
smaller products; this measures whether it pays, per family and length, at
k = 1 and with elimination (flat profile), every block size in one
interleaved group (median of rounds).

    python benchmarks/attention_blocks.py --family gpt2 --seq_len 1024 --blocks 0,128,256
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


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--family", default="gpt2", choices=["gpt2", "llama", "t5", "bert"])
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--blocks", default="0,128,256")
  p.add_argument("--ks", default="1.0,0.9")
  p.add_argument("--repeats", type=int, default=8)
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  fns, rows = {}, []
  for block in [int(b) for b in args.blocks.split(",")]:
    spec = argparse.Namespace(family=args.family, seq_len=args.seq_len, batch=1,
                              attention_block=block)
    forward, params, ids, mask, L, jit_kwargs = layer_breakdown.build(spec)
    for k in [float(x) for x in args.ks.split(",")]:
      counts = schedule.keep_counts(args.seq_len, k, schedule.flat_profile(L))
      c = jax.jit(forward(counts), **jit_kwargs).lower(params, ids, mask).compile()
      name = f"block={block} k={k}"
      fns[name] = lambda c=c, p=params: c(p, ids, mask)
      rows.append({"block": block, "k": k, "name": name,
                   "temp_mb": c.memory_analysis().temp_size_in_bytes / 1e6})
  med = timing.interleaved_medians(fns, repeats=args.repeats)
  print(f"{args.family}, {args.seq_len} tokens, batch 1\n\n| block | k | ms | scratch MB |\n"
        "|---|---|---|---|")
  for r in rows:
    r["ms"] = 1e3 * med[r.pop("name")]
    print(f"| {r['block'] or 'all'} | {r['k']} | {r['ms']:.0f} | {r['temp_mb']:.0f} |")
  if args.out:
    Path(args.out).write_text(json.dumps(
        {"benchmark": "attention_blocks", "command": "python " + " ".join(sys.argv),
         "device": timing.device_name(), "jax_version": jax.__version__, "settings": vars(args),
         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
  main()
