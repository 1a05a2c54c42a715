"""The paper's Table III for the one command's models: per task, HF, our flat baseline, the anytime model at 1.5x ... 3.5x.

    python benchmarks/table3.py --run sst2=WORKDIR --run cola=WORKDIR --run stsb=WORKDIR

Each WORKDIR is one ``python train.py --config=glue_<task>`` run (the two-stage
recipe), so it holds the anytime model, and ``WORKDIR/stage1`` the flat baseline
(fine-tuned without elimination, evaluated at k = 1). Per task:

* HF PyTorch: the mean over seeds of ``transformers.Trainer``
  (``benchmarks/results/<task>_seeds.json``, from ``glue_seeds.py``), when present;
* the flat baseline: stage 1 at k = 1;
* the anytime model at each expected speedup target (eq. 7 over the dev set's
  buckets), as ``eval.py --speedup X`` chooses it: per bucket, the largest k that
  reaches X. A target that no k reaches stays empty.

Writes ``benchmarks/results/table3.json`` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "table3.json"
TARGETS = (1.5, 2.0, 2.5, 3.0, 3.5)
METRIC = {"sst2": "accuracy", "cola": "mcc", "stsb": "pearson"}


class Evaluator:
  """Restores a workdir and encodes its dev set once; ``row`` evaluates it at any target."""

  def __init__(self, workdir: Path, cache):
    from latadj_jax.data import splits
    from latadj_jax.tuning import offline
    self.workdir, self.cache = workdir, cache
    self.r, _ = offline.prepare(workdir, 0, "")
    (self.enc,) = splits.load_encoded_split(self.r.run.config, self.r.task, self.r.tokenizer,
                                            "validation", 0)

  def row(self, **target) -> dict:
    """Returns the dev-set row at ``coeff=`` or ``speedup=`` (per-bucket choices)."""
    from latadj_jax.tuning import offline
    choices = offline.choose(self.workdir, **target)
    row = offline.evaluate_choices(self.r, choices, self.enc, time_repeats=1, cache=self.cache)
    row["met"] = all(c.met for c in choices.values())
    return row


def task_row(task: str, workdir: Path) -> dict:
  """Returns one task's cells: HF mean, flat baseline, and the anytime model at each target."""
  from latadj_jax.runtime.executables import ExecutableCache
  metric = METRIC[task]
  seeds = REPO / "benchmarks" / "results" / f"{task}_seeds.json"
  hf = json.loads(seeds.read_text()).get("summary", {}).get("hf") if seeds.exists() else None
  cache = ExecutableCache()
  base = Evaluator(workdir / "stage1", cache).row(coeff=1.0)
  anytime = Evaluator(workdir, cache)
  cells = {}
  for target in TARGETS:
    row = anytime.row(speedup=target)
    cells[f"{target:g}"] = {metric: row[metric], "met": row["met"],
                            "expected_speedup": row["expected_speedup_all_buckets"],
                            "choices": row["choices"]}
  return {"workdir": str(workdir), "metric": metric,
          "hf": None if hf is None else {"mean": hf["mean"], "n": hf["n"], "min": hf["min"],
                                         "max": hf["max"]},
          "flat_baseline": base[metric], "anytime": cells}


def markdown(rows: dict) -> str:
  head = "| task | metric | HF PyTorch (mean of seeds) | flat baseline | " + \
         " | ".join(f"{t:g}x" for t in TARGETS) + " |"
  lines = [head, "|---" * (4 + len(TARGETS)) + "|"]
  for task, r in rows.items():
    hf = f"{100 * r['hf']['mean']:.2f} (n={r['hf']['n']})" if r["hf"] else ""
    cells = [f"{100 * c[r['metric']]:.2f}" if c["met"] else "" for c in r["anytime"].values()]
    lines.append(f"| {task} | {r['metric']} | {hf} | {100 * r['flat_baseline']:.2f} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--run", action="append", default=[], help="TASK=WORKDIR (repeat per task)")
  args = p.parse_args()
  result = json.loads(OUT.read_text()) if OUT.exists() else {}
  from latadj_jax.runtime import timing
  result.update({"benchmark": "table3", "device": timing.device_name()})
  rows = result.setdefault("tasks", {})
  for item in args.run:
    task, _, workdir = item.partition("=")
    if task not in METRIC or not workdir:
      sys.exit(f"--run {item!r}: expected TASK=WORKDIR with TASK one of {', '.join(METRIC)}")
    rows[task] = task_row(task, Path(workdir))
    OUT.write_text(json.dumps(result, indent=2) + "\n")
  table = markdown({t: rows[t] for t in METRIC if t in rows})
  result["markdown"] = table
  OUT.write_text(json.dumps(result, indent=2) + "\n")
  print(table)
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
