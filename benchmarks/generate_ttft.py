"""Time-to-first-token and decode tokens/s of a trained LM workdir against k.

    python benchmarks/generate_ttft.py --workdir=workdirs/lm_text --coeff 0.8,0.85,0.9,0.95,1.0
    python benchmarks/generate_ttft.py --workdir=WD --prompt "To be, or not" --new_tokens 64

The prompt is the workdir's own held-out text (its first ``--prompt_len``
tokens) unless ``--prompt`` or ``--prompt_file`` is given. For each k, with the
workdir's profile: the prompt's keep counts, the expected prefill speedup
(eq. 7), the XLA FLOPs ratio of the TTFT program, the time to first token
(prefill with elimination, the KV caches and the first greedy token), decode
tokens/s over the remaining new tokens (one ``lax.fori_loop``; the caches of
an eliminated prompt are shorter, so each step is cheaper too) and the greedy
continuation. Times are medians of interleaved runs, so load drift hits every
k alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.models import generate as gen
from latadj_jax.runtime import timing
from latadj_jax.tasks import lm_eval
from latadj_jax.tuning import offline


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="an LM workdir (train.py --config=lm_text)")
  p.add_argument("--coeff", default="0.8,0.85,0.9,0.95,1.0", help="comma-separated k values")
  p.add_argument("--prompt", default="", help="prompt text (default: the held-out split)")
  p.add_argument("--prompt_file", default="", help="read the prompt from this file")
  p.add_argument("--prompt_len", type=int, default=0, help="prompt tokens (default: block size)")
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--batch", type=int, default=1, help="the prompt repeated this many times")
  p.add_argument("--profile", default="", help="'flat' or 'v1,v2,...' instead of the stored profile")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
  p.add_argument("--out", default="", help="write the results as JSON here")
  return p.parse_args(argv)


def prompt_ids(args, r: lm_eval.RestoredLM) -> np.ndarray:
  """Returns the prompt's token ids, cut to ``--prompt_len`` (and to what the positions allow)."""
  config = r.run.config
  room = r.model.max_positions - args.new_tokens
  n = min(args.prompt_len or config.block_size, room)
  if n < 1:
    raise ValueError(f"--new_tokens {args.new_tokens} leaves no room for a prompt in "
                     f"{r.model.max_positions} positions")
  if args.prompt or args.prompt_file:
    prompt = args.prompt or Path(args.prompt_file).read_text()
    ids = np.asarray(r.tokenizer(prompt, add_special_tokens=False)["input_ids"], np.int32)
    return ids[-n:]
  return text.tokenize_stream(text.load_texts(config, "validation"), r.tokenizer)[:n]


def run(args: argparse.Namespace) -> dict:
  """Returns the results dict: settings, device and one row per k."""
  r = lm_eval.restore(args.workdir)
  coeffs = offline.parse_coeffs(args.coeff)
  n_layer = r.model.num_layers
  profile = (schedule.parse_profile(args.profile, n_layer) if args.profile else r.run.profile)
  ids = prompt_ids(args, r)
  N, T = len(ids), args.new_tokens
  ids_BxN = jnp.asarray(np.tile(ids, (args.batch, 1)), jnp.int32)
  mask_BxN = jnp.ones_like(ids_BxN)
  rng = jax.random.PRNGKey(0)
  base_counts = schedule.keep_counts(N, 1.0, schedule.flat_profile(n_layer))
  base_flops = timing.compiled_flops(gen.prefill_fn(r.model, base_counts, T).lower(
      r.params, ids_BxN, mask_BxN, rng).compile())
  rows, fns = [], {}
  for k in coeffs:
    counts = schedule.keep_counts(N, k, profile)
    ttft_fn, decode_fn = gen.prefill_fn(r.model, counts, T), gen.decode_fn(r.model, T)
    first, state = ttft_fn(r.params, ids_BxN, mask_BxN, rng)
    tokens, _ = decode_fn(r.params, first, state, rng)
    fns[f"ttft {k}"] = lambda f=ttft_fn: f(r.params, ids_BxN, mask_BxN, rng)[0]
    fns[f"decode {k}"] = lambda f=decode_fn, a=first, s=state: f(r.params, a, s, rng)[0]
    flops = timing.compiled_flops(ttft_fn.lower(r.params, ids_BxN, mask_BxN, rng).compile())
    rows.append({"coeff": k, "keep_counts": list(counts),
                 "expected_speedup": schedule.expected_speedup(N, counts),
                 "flops_speedup": base_flops / flops,
                 "cache_sizes": [int(c["k"].shape[1]) for c in state["caches"]],
                 "continuation": r.tokenizer.decode(np.asarray(tokens[0]).tolist())})
    print(f"compiled k={k}: counts {list(counts)}", file=sys.stderr)
  med = timing.interleaved_medians(fns, repeats=args.repeats, warmup=1)
  for row in rows:
    k = row["coeff"]
    row["ttft_ms"] = 1e3 * med[f"ttft {k}"]
    row["decode_tokens_per_s"] = args.batch * (T - 1) / med[f"decode {k}"]
    row["tokens_per_s"] = args.batch * T / (med[f"ttft {k}"] + med[f"decode {k}"])
  base = next((row for row in rows if row["coeff"] == 1.0), rows[-1])
  for row in rows:
    row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"]
  return {"benchmark": "generate_ttft", "command": "python " + " ".join(sys.argv),
          "device": timing.device_name(), "jax_version": jax.__version__,
          "workdir": str(r.run.workdir), "step": r.step,
          "settings": {"prompt_tokens": N, "new_tokens": T, "batch": args.batch,
                       "profile": list(profile), "repeats": args.repeats,
                       "model": dict(n_layer=n_layer, n_embd=r.model.config.hidden_size,
                                     n_head=r.model.config.num_attention_heads,
                                     vocab_size=r.model.vocab_size),
                       "ttft": "prefill with elimination + KV caches + first greedy token",
                       "decode": f"{T - 1} greedy steps in one lax.fori_loop",
                       "tokens_per_s": "batch * new_tokens / (TTFT + decode)"},
          "prompt": r.tokenizer.decode(ids.tolist()), "rows": rows}


def markdown(result: dict) -> str:
  """Returns the results as a Markdown table."""
  s = result["settings"]
  lines = [f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, batch {s['batch']}, "
           f"{result['device']}", "",
           "| k | keep counts | expected S (eq. 7) | FLOPs speedup | TTFT ms | TTFT speedup "
           "| decode tok/s | end-to-end tok/s |", "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['coeff']:g} | {r['keep_counts']} | {r['expected_speedup']:.2f}x | "
                 f"{r['flops_speedup']:.2f}x | {r['ttft_ms']:.1f} | {r['ttft_speedup']:.2f}x | "
                 f"{r['decode_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} |")
  lines += ["", "greedy continuations:"]
  lines += [f"  k={r['coeff']:g}: {r['continuation']!r}" for r in result["rows"]]
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
  print(markdown(result))


if __name__ == "__main__":
  from latadj_jax.runtime import cli
  cli.run(lambda argv: main(argv))
