"""Prefill latency, time-to-first-token and decode speed of GPT-2 small against k.

The model is GPT-2-small-shaped (12 layers, 768 wide, 12 heads, vocab 50257)
with random weights: no GPT-2 weights can be had offline. Random weights give
no meaningful ACC curve to fit a profile to, so this uses the flat profile
(``R_l = k`` at every layer) — docs/method.md section 2's no-training setting.
``n_positions`` is widened to ``seq_len + new_tokens`` so that a 1024-token
prompt can still be extended.

For each k it reports the keep counts, the prefill latency (median of
interleaved runs), the expected speedup (paper eq. 7), the XLA FLOPs ratio and
the measured speedup against k = 1, the time-to-first-token (prefill, KV caches
and the first token) and decode tokens/s.

    python benchmarks/gpt2_prefill.py            # the full run (~5 min on 2 CPU cores)
    python benchmarks/gpt2_prefill.py --layers 2 --seq_len 128 --repeats 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.models import generate as gen
from latadj_jax.runtime import timing


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ks", default="0.8,0.85,0.9,0.95,1.0", help="comma-separated k values")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpt2_prefill.json"))
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
  """Returns the results dict: settings, device and one row per k."""
  ks = [float(k) for k in args.ks.split(",")]
  T, N = args.new_tokens, args.seq_len
  model = models.build({"model_type": "gpt2", "n_layer": args.layers, "n_positions": N + T})
  cfg = model.config
  params = model.init(0)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, N)), jnp.int32)
  mask, rng = jnp.ones((1, N), jnp.int32), jax.random.PRNGKey(0)

  rows, prefill, ttft, decode = [], {}, {}, {}
  for k in ks:
    counts = schedule.keep_counts(N, k, schedule.flat_profile(model.num_layers))
    # The prompt forward alone; the caches it also returns are dropped by XLA here.
    forward = jax.jit(lambda p, i, m, c=counts: model.method(
        "prefill", p, models.Batch(i, m), c)[0])
    t0 = time.perf_counter()
    compiled = forward.lower(params, ids, mask).compile()
    compile_s = time.perf_counter() - t0
    ttft_fn = gen.prefill_fn(model, counts, T)
    first, state = ttft_fn(params, ids, mask, rng)
    decode_fn = gen.decode_fn(model, T)
    timing.block(decode_fn(params, first, state, rng))
    name = f"k={k}"
    prefill[name] = lambda c=compiled: c(params, ids, mask)
    ttft[name] = lambda f=ttft_fn: f(params, ids, mask, rng)[0]
    decode[name] = lambda f=decode_fn, a=first, s=state: f(params, a, s, rng)[0]
    rows.append({"k": k, "keep_counts": list(counts),
                 "expected_speedup": schedule.expected_speedup(N, counts),
                 "xla_flops": timing.compiled_flops(compiled), "compile_s": compile_s,
                 "cache_sizes": [int(c["k"].shape[1]) for c in state["caches"]]})
    print(f"compiled k={k}: counts {list(counts)} in {compile_s:.1f}s", file=sys.stderr)

  # One interleaved group over every k and every measurement, so machine-load
  # drift hits all of them alike and prefill, TTFT and decode stay comparable.
  groups = {"prefill": prefill, "ttft": ttft, "decode": decode}
  flat = timing.interleaved_medians(
      {f"{what} {name}": fn for what, fns in groups.items() for name, fn in fns.items()},
      repeats=args.repeats, warmup=1)
  medians = {what: {name: flat[f"{what} {name}"] for name in fns} for what, fns in groups.items()}
  base = next(r for r in rows if r["k"] == 1.0) if 1.0 in ks else rows[-1]
  base_s = medians["prefill"][f"k={base['k']}"]
  for r in rows:
    name = f"k={r['k']}"
    r["prefill_ms"] = 1e3 * medians["prefill"][name]
    r["xla_flops_ratio"] = r["xla_flops"] / base["xla_flops"]
    r["flops_speedup"] = base["xla_flops"] / r["xla_flops"]
    r["measured_speedup"] = base_s / medians["prefill"][name]
    r["ttft_ms"] = 1e3 * medians["ttft"][name]
    r["decode_tokens_per_s"] = (T - 1) / medians["decode"][name]
  return {
      "benchmark": "gpt2_prefill",
      "command": "python " + " ".join(sys.argv),
      "device": timing.device_name(),
      "jax_version": jax.__version__,
      "settings": {"model": "GPT-2-small-shaped, random weights",
                   "n_layer": cfg.num_hidden_layers, "n_embd": cfg.hidden_size,
                   "n_head": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
                   "n_positions": cfg.max_position_embeddings, "batch": 1, "seq_len": N,
                   "new_tokens": T,
                   "profile": "flat (R_l = k): no meaningful ACC to fit with random weights",
                   "repeats": args.repeats, "dtype": cfg.dtype,
                   "timing": "median of interleaved rounds (latadj_jax.runtime.timing.interleaved_medians)",
                   "prefill": "prompt forward with elimination + last-token logits",
                   "ttft": "prefill + KV caches + first greedy token",
                   "decode": f"{T - 1} greedy steps in one lax.fori_loop"},
      "baseline_k": base["k"],
      "rows": rows,
  }


def markdown(result: dict) -> str:
  """Returns the results as a Markdown table."""
  lines = [f"GPT-2 small shape, random weights, batch 1, {result['settings']['seq_len']}-token "
           f"prompt, flat profile, {result['device']}", "",
           "| k | N_1 … N_L | prefill ms | expected S (eq. 7) | XLA FLOPs ratio | FLOPs speedup "
           "| measured speedup | TTFT ms | decode tok/s |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    c = r["keep_counts"]
    lines.append(f"| {r['k']:.2f} | {c[0]} … {c[-1]} | {r['prefill_ms']:.0f} | "
                 f"{r['expected_speedup']:.2f}x | {r['xla_flops_ratio']:.3f} | "
                 f"{r['flops_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
                 f"{r['ttft_ms']:.0f} | {r['decode_tokens_per_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(markdown(result))
  print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
