"""Survivor perplexity on held-out Shakespeare at each k, for a tiny GPT-2 trained here with lm_text.

    python benchmarks/lm_shakespeare.py            # trains workdirs/lm_text (~5 min on 2 busy CPU cores)
    python benchmarks/lm_shakespeare.py --workdir=WD --config.max_steps=50   # a quick check

It runs ``lm.train_and_evaluate`` on the ``lm_text`` config (a random
4-layer, 128-wide GPT-2, byte-level tokens, one epoch over the four plays with
elimination at k = 0.9 and a flat profile), then evaluates the one trained
model at every k. Perplexity is per byte, over the positions that reach the
last layer, with the fraction of positions scored beside it. A last-word
check (LAMBADA-style, built here from the held-out lines: each speech cut
after its last word of four or more letters) runs through the KV-cache path.
This shows the pipeline end to end; the numbers say nothing about GPT-2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import jax

from latadj_jax.data import text
from latadj_jax.runtime import config_lib, timing
from latadj_jax.training import lm

PLAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "shakespeare"

KS = (0.8, 0.85, 0.9, 0.95, 1.0)
OUT = Path(__file__).parent / "results" / "lm_shakespeare.json"


def last_word_passages(docs: list[str], max_chars: int = 400, limit: int = 300) -> list[str]:
  """Returns speeches from held-out text, each cut right after its last word of 4+ letters."""
  out = []
  for doc in docs:
    for speech in re.split(r"\n\s*\n", doc):
      flat = " ".join(speech.split())
      words = list(re.finditer(r"[A-Za-z]{4,}", flat))
      if len(flat) < 80 or not words:
        continue
      passage = flat[:words[-1].end()][-max_chars:]
      if " " in passage:
        out.append(passage[passage.find(" ") + 1:] if len(passage) == max_chars else passage)
  return out[:limit]


def main(argv: list[str]) -> int:
  # The four plays, not lm_text's shipped one-play sample; a later --config.data_dir wins.
  name, overrides, rest = config_lib.split_argv(["--config=lm_text", f"--config.data_dir={PLAYS}",
                                                 *argv])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="workdirs/lm_text")
  p.add_argument("--out", default=str(OUT))
  args = p.parse_args(rest)
  config = config_lib.override(config_lib.load(name), overrides)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  passages = last_word_passages(text.read_local(config.data_dir, "validation", config.dev_fraction))
  lastword = workdir / "lastword_shakespeare.jsonl"
  lastword.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
  with config.unlocked():
    config.eval_coeffs, config.lambada = KS, str(lastword)
  t0, cpu0 = time.perf_counter(), time.process_time()
  final = lm.train_and_evaluate(config, workdir)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0  # CPU: all threads
  results = json.loads((workdir / "eval_results.json").read_text())
  log = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [l["loss"] for l in log if "loss" in l]
  rows = [{**r, "bits_per_byte": r["nll"] / math.log(2)} for r in results["rows"]]
  result = {
      "benchmark": "lm_shakespeare", "command": "python " + " ".join(sys.argv),
      "device": timing.device_name(), "jax_version": jax.__version__,
      "settings": {"config": "lm_text", "overrides": overrides, "model": dict(config.gpt2),
                   "tokenizer": "byte-level (UTF-8 bytes + EOS between files; vocab 257)",
                   "data": "four Shakespeare plays (Project Gutenberg); last 10% of each file's "
                           "lines held out", "block_size": config.block_size,
                   "batch_size": config.batch_size, "learning_rate": config.learning_rate,
                   "train_coeff": config.coeff, "profile": results["profile"],
                   "steps": log[-1]["step"] if log else None, "num_epochs": config.num_epochs,
                   "train_and_eval_wall_s": wall, "train_and_eval_cpu_s": cpu, "first_logged_loss": losses[0] if losses else None,
                   "last_logged_loss": losses[-1] if losses else None,
                   "final_eval_at_train_coeff": final,
                   "last_word": f"{len(passages)} held-out speeches cut after their last word "
                                "of 4+ letters; accuracy = every byte of the word greedy-correct, "
                                "perplexity per word",
                   "perplexity": results["perplexity"]},
      "rows": rows}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(markdown(result))
  print(f"wrote {out}", file=sys.stderr)
  return 0


def markdown(result: dict) -> str:
  """Returns the figures as a Markdown table."""
  lines = ["| k | keep counts (of 128) | fraction scored | perplexity / byte | bits / byte | "
           "last-word acc % | last-word ppl | expected S | FLOPs ratio | measured |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['coeff']:g} | {r['keep_counts']} | {r['fraction_scored']:.3f} | "
                 f"{r['perplexity']:.3f} | {r['bits_per_byte']:.3f} | "
                 f"{100 * r['lambada_accuracy']:.1f} | {r['lambada_perplexity']:.1f} | "
                 f"{r['expected_speedup']:.2f}x | {r['flops_ratio']:.2f}x | "
                 f"{r['measured_speedup']:.2f}x |")
  return "\n".join(lines)


if __name__ == "__main__":
  from latadj_jax.runtime import cli
  cli.run(main)
