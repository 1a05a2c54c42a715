"""Flan-T5-base encoder speedup against k, training-free (flat profile), plus greedy generation latency.

The model is Flan-T5-base-shaped (d_model 768, 12 + 12 layers, 12 heads,
d_ff 2048, gated-GELU, vocab 32128, untied head) with random weights: no T5
weights can be had offline. As in the paper's Flan-T5 experiment (Table VI)
the profile is flat, so ``R_l = k`` at every encoder layer.

For each k it reports the encoder keep counts, the expected speedup (paper
eq. 7), the XLA FLOPs ratio and the measured encoder speedup against k = 1
(medians of interleaved runs), and the end-to-end greedy generation latency
(encoder once with elimination, then a KV-cached decode loop) for a few new
tokens. The paper reports 1.83x at k = 0.9 for Flan-T5-base.

    python benchmarks/t5_encoder.py                      # the full run (~3 min on 2 CPU cores)
    python benchmarks/t5_encoder.py --batches 1,8        # also batch 8 (encoder only, slower)
    python benchmarks/t5_encoder.py --layers 2 --seq_len 128 --repeats 2 --out /tmp/t5.json  # quick
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
from latadj_jax.models import t5_generate as gen
from latadj_jax.runtime import timing


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ks", default="0.8,0.85,0.9,0.95,1.0", help="comma-separated k values")
  p.add_argument("--batches", default="1",
                 help="comma-separated batch sizes (generation runs for the first only)")
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--layers", type=int, default=12, help="encoder and decoder layers each")
  p.add_argument("--new_tokens", type=int, default=4, help="greedy tokens; 0 skips generation")
  p.add_argument("--repeats", type=int, default=10, help="timed rounds per measurement")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "t5_encoder.json"))
  return p.parse_args(argv)


def flan_t5_base(layers: int) -> models.Model:
  """Returns a Flan-T5-base-shaped model."""
  return models.build({"model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64,
                       "d_ff": 2048, "num_layers": layers, "num_heads": 12,
                       "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})


def random_params(model: models.Model, seed: int = 0) -> dict:
  """Returns random float32 parameters: norms at 1, other weights N(0, 1/fan_in).

  Drawn with NumPy on the shapes from ``Model.abstract_params``: compiling
  ``Model.init`` for a 250M-parameter model takes minutes on a small CPU.
  """
  shapes = model.abstract_params()
  rng = np.random.default_rng(seed)
  def draw(path, s):
    if path[-1].key == "weight":  # T5LayerNorm
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) * s.shape[0] ** -0.5)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def run(args: argparse.Namespace) -> dict:
  """Returns the results dict: settings, device and one row per (batch, k)."""
  ks = [float(k) for k in args.ks.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  N, T = args.seq_len, args.new_tokens
  model = flan_t5_base(args.layers)
  cfg = model.config
  params = random_params(model)

  rows = []
  for b_i, B in enumerate(batches):
    ids = jnp.asarray(np.random.default_rng(B).integers(2, cfg.vocab_size, (B, N)), jnp.int32)
    mask = jnp.ones((B, N), jnp.int32)
    enc_fns, gen_fns, batch_rows = {}, {}, []
    for k in ks:
      counts = schedule.keep_counts(N, k, schedule.flat_profile(cfg.num_layers))
      fn = jax.jit(lambda p, i, m, c=counts: model.method(
          "encode", p, models.Batch(i, m), c).last_hidden_state)
      t0 = time.perf_counter()
      compiled = fn.lower(params, ids, mask).compile()
      row = {"batch": B, "k": k, "keep_counts": list(counts),
             "expected_speedup": schedule.expected_speedup(N, counts),
             "xla_flops": timing.compiled_flops(compiled),
             "compile_s": time.perf_counter() - t0}
      enc_fns[f"k={k}"] = lambda c=compiled: c(params, ids, mask)
      if T > 0 and b_i == 0:
        run_gen = lambda c=counts: gen.generate(model, params, ids, mask, max_new_tokens=T,
                                                keep_counts=c)["tokens"]
        timing.block(run_gen())  # compile outside the timed rounds
        gen_fns[f"k={k}"] = run_gen
      batch_rows.append(row)
      print(f"compiled B={B} k={k}: counts {list(counts)} in {row['compile_s']:.1f}s",
            file=sys.stderr)

    # Interleaved rounds, so machine-load drift hits every k alike.
    enc_s = timing.interleaved_medians(enc_fns, repeats=args.repeats, warmup=1)
    gen_s = timing.interleaved_medians(gen_fns, repeats=max(1, args.repeats // 2), warmup=1) \
        if gen_fns else {}
    base = next((r for r in batch_rows if r["k"] == 1.0), batch_rows[-1])
    for r in batch_rows:
      name = f"k={r['k']}"
      r["encoder_ms"] = 1e3 * enc_s[name]
      r["xla_flops_ratio"] = r["xla_flops"] / base["xla_flops"]
      r["flops_speedup"] = base["xla_flops"] / r["xla_flops"]
      r["measured_speedup"] = enc_s[f"k={base['k']}"] / enc_s[name]
      if name in gen_s:
        r["generate_ms"] = 1e3 * gen_s[name]
        r["generate_speedup"] = gen_s[f"k={base['k']}"] / gen_s[name]
    rows += batch_rows

  return {
      "benchmark": "t5_encoder",
      "command": "python " + " ".join(sys.argv),
      "device": timing.device_name(),
      "jax_version": jax.__version__,
      "settings": {"model": "Flan-T5-base-shaped, random weights", "d_model": cfg.d_model,
                   "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers,
                   "num_heads": cfg.num_heads, "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size,
                   "feed_forward_proj": cfg.feed_forward_proj, "batches": batches,
                   "seq_len": N, "new_tokens": T, "dtype": cfg.dtype, "repeats": args.repeats,
                   "profile": "flat (R_l = k), the paper's training-free Flan-T5 setting",
                   "timing": "median of interleaved rounds (latadj_jax.runtime.timing.interleaved_medians)",
                   "encoder": "embedding + encoder blocks with Sort+Eliminate + final_layer_norm",
                   "generate": f"encoder once, then {T} greedy KV-cached decoder steps "
                               f"(lax.fori_loop), first batch only",
                   "paper": "Table VI, Flan-T5-base: 1.83x at k = 0.90, 2.94x at k = 0.80"},
      "rows": rows,
  }


def markdown(result: dict) -> str:
  """Returns the results as a Markdown table."""
  s = result["settings"]
  lines = [f"Flan-T5-base shape, random weights, {s['seq_len']}-token prompts, flat profile, "
           f"{result['device']}", "",
           "| batch | k | N_1 … N_L | encoder ms | expected S (eq. 7) | XLA FLOPs ratio "
           "| FLOPs speedup | measured speedup | generate ms | generate speedup |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    c = r["keep_counts"]
    gen_ms = f"{r['generate_ms']:.0f}" if "generate_ms" in r else "–"
    gen_x = f"{r['generate_speedup']:.2f}x" if "generate_speedup" in r else "–"
    lines.append(f"| {r['batch']} | {r['k']:.2f} | {c[0]} … {c[-1]} | {r['encoder_ms']:.0f} | "
                 f"{r['expected_speedup']:.2f}x | {r['xla_flops_ratio']:.3f} | "
                 f"{r['flops_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {gen_ms} | {gen_x} |")
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
