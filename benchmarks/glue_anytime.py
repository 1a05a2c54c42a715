"""Accuracy across the offline-tuning range: no elimination, trained at k = 1, anytime (issues 15, 22).

    python benchmarks/glue_anytime.py --task sst2 --modes base,elim_k1,s2_full,s2_frozen,s2_largest,s2_full_flat
    python benchmarks/glue_anytime.py --task sst2 --max_train_examples 20000 --tag 20k --modes base,elim_k1,anytime
    python benchmarks/glue_anytime.py --task stsb --epochs 3 --stage2_epochs 2 --modes base,elim_k1,s2_full
    python benchmarks/glue_anytime.py --task sst2 --modes first,random    # the Table VII ablation

Each mode is one ``train.py`` run of MiniLM with the same data, seed and recipe
(batch 32, AdamW lr 5e-5, 1 epoch unless ``--epochs``, max length 64, length
buckets 32/64):

* ``base``: no elimination (flat profile, k = 1);
* ``elim_k1``: the ACC profile, trained at k = 1 alone;
* ``anytime``: the ACC profile, trained for every k of ``--train_coeffs`` at once
  from the pretrained model, teacher = the largest k (issue 15's recipe);
* ``s2_full`` / ``s2_frozen`` / ``s2_largest``: stage 2, from the ``base``
  workdir (``--config.init_from``), ``--stage2_epochs`` epochs, anytime with
  that teacher, ``k = 1`` always trained plus ``--anytime_samples`` drawn, the
  ``elim_k1`` run's profile (so equal k means equal keep counts), and the
  checkpoint chosen by the mean dev metric over the sweep grid;
* ``s2_<teacher>_flat``: the same with the flat profile, over flat k 0.6 ... 1;
* a ``_nodrop`` suffix (``s2_full_flat_nodrop``): dropout on the teacher pass only;
* ``s2_control``: stage 2's schedule (init, epochs, lr, warm-up, checkpoint choice over
  the flat grid) with no students: the full model on its label loss alone, the control
  that separates what the schedule costs from what the students cost;
* ``first`` / ``random``: trained and evaluated at k = 1 with the ``first`` or
  ``random`` survivor rule instead of the score (paper Table VII);
* ``recipe``: the one command a user runs, ``train.py --config=glue_<task>`` with
  only the model, the data and ``--recipe_flags``: both stages, with the config's
  own settings (not this script's ``--epochs``, ``--lr`` and the rest). Its stage 1
  is swept too, as ``recipe/stage1``.

Each model is then swept over ``--sweep`` with ``eval.py``: accuracy (or the
task metric), the expected speedup (eq. 7, over the dev set's buckets), the XLA
FLOPs ratio and the measured one. The anytime model is also swept with every
example padded to 64 (the paper's fixed-length setting, labelled as such).
Finally the train step of k = 1 and of anytime are timed in one process,
interleaved, for the cost ratio, and the anytime sweep runs in two fresh
processes sharing one new compilation cache (the second should skip compiling). Writes ``benchmarks/results/<task>[_<tag>]_anytime.json``
and a plot of the metric against the expected speedup, one curve per mode.
Finished workdirs under ``--root`` are reused, not retrained.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {"sst2": "glue_sst2", "stsb": "glue_stsb", "cola": "glue_cola", "imdb": "imdb"}
MODES = {  # mode -> train.py overrides; stage-2 modes are composed by mode_flags
    "base": ["--config.coeff=1", "--config.profile=flat"],
    "elim_k1": ["--config.coeff=1", "--config.profile=acc"],
    "anytime": ["--config.coeff=1", "--config.profile=acc", "--config.teacher=largest",
                "--config.anytime_samples=1", "--config.anytime_always="],  # issue 15's recipe
    "first": ["--config.coeff=1", "--config.profile=acc", "--config.survivors=first"],
    "random": ["--config.coeff=1", "--config.profile=acc", "--config.survivors=random"],
}
TEACHERS = ("full", "frozen", "largest")


CONTROL = "s2_control"
RECIPE = "recipe"
STAGE1 = "recipe/stage1"  # the one command's stage 1, swept as a mode of its own


def mode_flags(mode: str) -> list[str]:
  """Returns a mode's train.py overrides: MODES, ``s2_control`` or ``s2_<teacher>[_flat][_nodrop]``."""
  if mode in MODES:
    return MODES[mode]
  if mode == CONTROL:
    return ["--config.coeff=1", "--config.profile=flat"]
  parts = mode.split("_")
  if parts[0] != "s2" or len(parts) < 2 or parts[1] not in TEACHERS or \
     not set(parts[2:]) <= {"flat", "nodrop"}:
    sys.exit(f"unknown mode {mode!r}: one of {', '.join(MODES)} or s2_<teacher>[_flat][_nodrop] "
             f"with teacher in {', '.join(TEACHERS)}")
  flags = ["--config.coeff=1", f"--config.teacher={parts[1]}"]
  flags += ["--config.profile=flat"] if "flat" in parts else []
  return flags + (["--config.student_dropout=false"] if "nodrop" in parts else [])


def is_flat(mode: str) -> bool:
  """Whether a mode is trained and swept over flat k (which never exceeds 1)."""
  return mode in ("base", CONTROL, RECIPE, STAGE1) or (mode.startswith("s2_") and
                                                         "flat" in mode.split("_"))


def run(cmd: list[str], log: Path) -> float:
  """Runs ``cmd`` in the repo, writing its output to ``log``; returns the wall seconds."""
  print("$", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  with open(log, "a") as f:  # a resumed run keeps the killed one's log above it
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
  if proc.returncode:
    sys.exit(f"failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
  return time.perf_counter() - t0


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(workdir: Path) -> bool:
  """True once train.py reached the last step (a killed run has eval rows but no marker)."""
  return (workdir / "complete.json").exists()  # latadj_jax.runtime.workdir.COMPLETE


def acc_profile(args) -> tuple[float, ...]:
  """The k = 1 model's ACC profile: ``--acc_profile``, else the ``elim_k1`` workdir's."""
  if args.acc_profile:
    return tuple(float(e) for e in args.acc_profile.split(","))
  path = args.root / "elim_k1" / "profile.json"
  if not path.exists():
    sys.exit(f"{path} is missing: train the elim_k1 mode first, or pass --acc_profile "
             "(its profile, as recorded in the results JSON's train.elim_k1.profile)")
  return tuple(json.loads(path.read_text())["ep"])


def train_coeffs(args, mode: str) -> str:
  """Returns a stage-2 mode's students' k (none for the control)."""
  if mode == CONTROL:
    return ""
  return args.flat_train_coeffs if is_flat(mode) else args.train_coeffs


def train(args, mode: str) -> dict:
  """Trains one mode (or reuses its finished workdir); returns its summary."""
  from latadj_jax.runtime import workdir as wd
  workdir = args.root / mode
  if mode == RECIPE:
    cmd = [sys.executable, "train.py", f"--config={CONFIGS[args.task]}",
           f"--config.model={args.model}", f"--config.data_dir={args.data_dir}",
           "--config.progress=false", "--config.log_every=100", *args.recipe_flags.split(),
           f"--workdir={workdir}"]
    out = summarize(cmd, workdir, args.root / f"{mode}.log")
    out["stage1"] = summarize(cmd, workdir / "stage1", args.root / f"{mode}.log")  # finished: read
    # Both stages, from stage 1's first file to stage 2's last (a resumed run includes its pause).
    out["command_wall_seconds"] = ((workdir / "metrics.jsonl").stat().st_mtime
                                   - (workdir / "stage1" / "config.json").stat().st_mtime)
    return out
  cmd = [sys.executable, "train.py", f"--config={CONFIGS[args.task]}",
         f"--config.model={args.model}", f"--config.data_dir={args.data_dir}",
         f"--config.max_train_examples={args.max_train_examples}",
         f"--config.num_epochs={args.epochs}", f"--config.learning_rate={args.lr}",
         f"--config.max_len={args.max_len}", f"--config.buckets={args.buckets}",
         "--config.batch_size=32", "--config.progress=false", "--config.log_every=100",
         f"--config.seed={args.seed}", f"--config.max_grad_norm={args.max_grad_norm}",
         "--config.recipe=single", *mode_flags(mode), f"--workdir={workdir}"]
  if mode == "anytime":
    cmd += [f"--config.train_coeffs={args.train_coeffs}"]
  if mode.startswith("s2_"):
    flat = is_flat(mode)
    grid = args.flat_sweep if flat else args.sweep
    cmd += [f"--config.init_from={args.root / 'base'}", f"--config.num_epochs={args.stage2_epochs}",
            f"--config.learning_rate={args.stage2_lr or args.lr}",
            f"--config.train_coeffs={train_coeffs(args, mode)}",
            f"--config.anytime_samples={args.anytime_samples}", "--config.anytime_always=1.0",
            f"--config.select_coeffs={grid}", f"--config.eval_every={args.eval_every}",
            *args.stage2_flags.split()]
    if not flat:  # the k = 1 model's profile: at equal k, equal keep counts
      cmd.append(f"--config.profile={','.join(f'{e:.6f}' for e in acc_profile(args))}")
  return summarize(cmd, workdir, args.root / f"{mode}.log")


def summarize(cmd: list[str], workdir: Path, log: Path) -> dict:
  """Runs ``cmd`` unless ``workdir`` finished (a killed run resumes); returns the run's summary."""
  from latadj_jax.runtime import workdir as wd
  done = finished(workdir)
  wall, resumed = None, workdir.exists() and not done
  if done:
    print(f"reusing finished run {workdir}")
  else:
    wall = run(cmd, log)
  rows = read_jsonl(workdir / "metrics.jsonl")
  rates = [r["examples_per_s"] for r in rows if "examples_per_s" in r]
  return {
      "command": " ".join(cmd[1:]),
      "final_eval": {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval_")},
      "steps": rows[-1]["step"],
      # The first interval includes compiling; the median of the rest is the steady rate.
      "train_examples_per_s_median": sorted(rates[1:])[len(rates[1:]) // 2] if len(rates) > 1 else None,
      "resumed": resumed,  # then wall_seconds is the resumed part only
      "wall_seconds": wall if wall is not None else
                      (workdir / "metrics.jsonl").stat().st_mtime - (workdir / "config.json").stat().st_mtime,
      "profile": json.loads((workdir / "profile.json").read_text()).get("ep"),
      "selected": wd.load_best(workdir),  # the checkpoint chosen by the mean over the k grid
      # every selection eval: how the metric at each k moved over the stage
      "selection_evals": [{"step": r["step"], **{k[5:]: v for k, v in r.items()
                                                 if k.startswith("eval_") and "@" in k or
                                                 k == "eval_mean_over_k"}}
                          for r in rows if "eval_mean_over_k" in r],
  }


def sweep(args, mode: str, coeffs: str, cache_dir: Path | None = None, tag: str = "") -> dict:
  """Runs ``eval.py`` on one mode's workdir; returns its results (rows, cache stats, wall)."""
  workdir = args.root / mode
  extra = [f"--cache_dir={cache_dir}"] if cache_dir else []
  wall = run([sys.executable, "eval.py", f"--workdir={workdir}", f"--coeff={coeffs}",
              f"--repeats={args.repeats}", *extra],
             args.root / f"eval_{mode.replace('/', '_')}{tag}.log")
  return {"wall_seconds": wall, **json.loads((workdir / "eval_results.json").read_text())}


def cache_check(args, mode: str, coeffs: str) -> dict:
  """Sweeps one mode's model in two fresh processes sharing one new compilation cache."""
  import shutil
  cache = args.root / "xla_cache_check"
  shutil.rmtree(cache, ignore_errors=True)
  first = sweep(args, mode, coeffs, cache, "_cache1")
  second = sweep(args, mode, coeffs, cache, "_cache2")
  return {name: {"wall_seconds": r["wall_seconds"], **r.get("cache", {})}
          for name, r in (("first", first), ("second", second))}


def fixed_length_sweep(workdir: Path, coeffs: str, repeats: int) -> list[dict]:
  """Returns sweep rows with every example padded to ``max_len``, as the paper pads."""
  from latadj_jax.data import splits
  from latadj_jax.tasks import classify
  from latadj_jax.tuning import offline
  from latadj_jax.tuning import sweep as tuning_sweep  # not this file's sweep()
  r = offline.restore(workdir)
  c = r.run.config
  (enc,) = splits.load_encoded_split(c, r.task, r.tokenizer, "validation", 0)
  clf = classify.Classifier(r.pre.model, r.pre.params, enc, (c.max_len,), c.eval_batch_size,
                            model_id=str(c.model), dtype=c.dtype,
                            metric_names=tuple(r.task.metrics), is_regression=r.task.is_regression)
  runs = tuning_sweep.plans(offline.parse_coeffs(coeffs), r.run.profile)
  return tuning_sweep.sweep(clf, runs, repeats=repeats, progress=False)


def step_time_ratio(args, modes: list[str], rounds: int = 8, steps: int = 5) -> dict:
  """Times a plain fine-tuning step (no elimination) and each mode's anytime step, interleaved, in one process.

  Each anytime step is built from its trained workdir's stored config and profile
  (teacher, students, distill), on one batch of bucket 32, batch 32.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from latadj_jax.core import schedule
  from latadj_jax.runtime import config_lib
  from latadj_jax.runtime import workdir as wd
  from latadj_jax.training import anytime, classifier, loop, profiling
  config = config_lib.load(CONFIGS[args.task])
  config.model = args.model
  pre, _, task = profiling.load_model_and_task(config)
  mesh = loop.make_mesh()
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(1000, 5000, (32, 32)).astype(np.int32),
               attention_mask=np.ones((32, 32), np.int32), token_type_ids=np.zeros((32, 32), np.int32),
               labels=rng.integers(0, 2, 32).astype(np.int32) if not task.is_regression
               else rng.random(32).astype(np.float32), weights=np.ones(32, np.float32))
  flat = (1.0,) * len(wd.load_run(args.root / modes[0]).profile)
  k1 = classifier.compiled_step(mesh, pre.model, schedule.keep_counts(32, 1.0, flat),
                                task.is_regression)
  fns = {"k1": (lambda s: k1(s, loop.shard_batch(batch, mesh), jax.random.PRNGKey(0)), 1, False)}
  specs = {}
  for mode in modes:
    run = wd.load_run(args.root / mode)
    spec = specs[mode] = anytime.spec_from_config(run.config)
    step = classifier.make_anytime_step(mesh, model=pre.model, spec=spec, profile=run.profile,
                                        buckets=(32,), is_regression=task.is_regression, seed=0)
    fns[mode] = (functools.partial(lambda step, s: step(s, batch, jax.random.PRNGKey(0)), step),
                 len(spec.draws()), spec.teacher == "frozen")
  times = {name: [] for name in fns}
  states = {}
  for name, (fn, draws, frozen) in fns.items():
    state = loop._replicate(loop.TrainState.create(
        apply_fn=None, params=jax.tree.map(jnp.copy, pre.params),
        tx=loop.make_optimizer(config, 1000),
        frozen=jax.tree.map(jnp.copy, pre.params) if frozen else None), mesh)
    for _ in range(draws * 3):  # compile every draw before timing
      state, out = fn(state)
    jax.block_until_ready(out)
    states[name] = state
  for _ in range(rounds):
    for name, (fn, _, _) in fns.items():
      state = states[name]
      t0 = time.perf_counter()
      for _ in range(steps):
        state, out = fn(state)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / steps)
      states[name] = state
  med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
  return {"bucket": 32, "batch": 32, "rounds": rounds, "steps_per_round": steps,
          "k1": "a plain fine-tuning step: no elimination",
          "specs": {m: {"teacher": sp.teacher, "coeffs": list(sp.coeffs), "samples": sp.num_sampled,
                        "always": list(sp.always), "distill": sp.distill} for m, sp in specs.items()},
          "step_ms": {k: 1e3 * v for k, v in med.items()},
          "ratio_to_k1": {k: v / med["k1"] for k, v in med.items() if k != "k1"}}


LABELS = {"base": "no elimination in training (flat profile at eval)",
          RECIPE: "the one command: the anytime model (flat)",
          STAGE1: "the one command's stage 1, swept without training for k (flat)",
          "elim_k1": "trained at k = 1 (ACC profile)",
          "anytime": "anytime from pretrained, teacher largest k (ACC)"}
TEACHER_LABELS = {"full": "no elimination", "frozen": "frozen stage 1", "largest": "largest k"}


def label(mode: str) -> str:
  """Returns a mode's legend entry."""
  if mode == CONTROL:
    return "stage 2 control: the full model on the labels, no students (flat)"
  if mode in LABELS or not mode.startswith("s2_"):
    return LABELS.get(mode, mode)
  parts = mode.split("_")
  extra = ", no student dropout" if "nodrop" in parts else ""
  return f"stage 2, teacher: {TEACHER_LABELS[parts[1]]}{extra} ({'flat' if 'flat' in parts else 'ACC'})"


def plot(result: dict, metric: str, out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for mode, rows in result["sweeps"].items():
    xs = [r["expected_speedup_all_buckets"] for r in rows]
    ys = [100 * r[metric] for r in rows]
    ax.plot(xs, ys, marker="o", label=label(mode))
  ax.set_xlabel("expected speedup (eq. 7, dev-set buckets), x")
  ax.set_ylabel(f"dev {metric} (%)")
  ax.set_title(f"{result['task']}: one model per curve, swept over k (MiniLM)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def markdown(result: dict, metric: str) -> str:
  """Returns one Markdown table per profile: k, expected speedup, then each mode's metric."""
  lines = []
  for flat in (False, True):
    modes = [m for m in result["sweeps"] if is_flat(m) == flat and (m in LABELS or m.startswith("s2_"))]
    if not modes:
      continue
    rows = {m: {r["coeff"]: r for r in result["sweeps"][m]} for m in modes}
    ks = sorted({k for m in modes for k in rows[m]})
    lines += ["", f"{'flat' if flat else 'ACC'} profile:", "",
              "| k | expected speedup | " + " | ".join(modes) + " |",
              "|---|---|" + "---|" * len(modes)]
    for k in ks:
      speed = next(rows[m][k]["expected_speedup_all_buckets"] for m in modes if k in rows[m])
      cells = [f"{100 * rows[m][k][metric]:.2f}" if k in rows[m] else "" for m in modes]
      lines.append(f"| {k:g} | {speed:.2f}x | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--task", default="sst2", choices=sorted(CONFIGS))
  p.add_argument("--data_dir", default="")
  p.add_argument("--model", default="")
  p.add_argument("--modes", default="base,elim_k1,anytime")
  p.add_argument("--max_train_examples", type=int, default=0)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--lr", type=float, default=5e-5)
  p.add_argument("--max_len", type=int, default=64)
  p.add_argument("--buckets", default="32,64")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_grad_norm", type=float, default=0.0, help="> 0: clip as HF's Trainer (1.0)")
  p.add_argument("--train_coeffs", default="0.8,0.9,1.0,1.1,1.2")
  p.add_argument("--anytime_samples", type=int, default=2)
  p.add_argument("--flat_train_coeffs", default="0.6,0.7,0.8,0.9,1.0")
  p.add_argument("--stage2_epochs", type=int, default=1)
  p.add_argument("--stage2_lr", type=float, default=0.0, help="stage 2's learning rate (0: --lr)")
  p.add_argument("--recipe_flags", default="", help="further train.py overrides for the "
                 "recipe mode, space-separated (e.g. '--config.distill=hidden'); use a --tag")
  p.add_argument("--stage2_flags", default="", help="further train.py overrides for the stage-2 "
                 "modes, space-separated (e.g. '--config.distill_weight=0.25'); use a --tag")
  p.add_argument("--eval_every", type=int, default=500, help="stage 2: steps between selection evals")
  p.add_argument("--sweep", default="0.7,0.8,0.85,0.9,0.95,1.0,1.1,1.2")
  p.add_argument("--flat_sweep", default="0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95,1.0")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tag", default="")
  p.add_argument("--root", type=Path, default=None)
  p.add_argument("--skip_timing", action="store_true")
  p.add_argument("--acc_profile", default="", help="stage 2's ACC profile, comma-separated "
                 "(default: the elim_k1 workdir's), so stage 2 need not retrain elim_k1")
  p.add_argument("--fixed_length_mode", default="", help="the trained mode swept padded to "
                 "max_len (default: the first anytime mode asked for; 'none' skips it)")
  args = p.parse_args()
  from configs import quickstart
  args.model = args.model or quickstart.minilm_dir()
  local = {"sst2": "glue/sst2", "stsb": "glue/STS-B", "cola": "glue/CoLA",
           "imdb": "polarity/reviews.csv"}[args.task]
  args.data_dir = args.data_dir or str(REPO.parent / "shared" / "data" / local)
  name = f"{args.task}_{args.tag}" if args.tag else args.task
  args.root = args.root or REPO / "workdirs" / f"{name}_anytime"
  args.root.mkdir(parents=True, exist_ok=True)
  out = REPO / "benchmarks" / "results" / f"{name}_anytime.json"
  result = json.loads(out.read_text()) if out.exists() else {}
  from latadj_jax.runtime import timing
  result.update({"benchmark": "glue_anytime", "task": args.task,
                 "device": timing.device_name(),
                 "settings": {k: str(v) for k, v in vars(args).items()}})
  result.setdefault("train", {})
  result.setdefault("sweeps", {})
  modes = args.modes.split(",")
  for mode in modes:
    result["train"][mode] = train(args, mode)
    # The ablation compares survivor rules at the score model's counts, k = 0.9 and 1.
    coeffs = ("0.9,1.0" if mode in ("first", "random") else
              args.flat_sweep if is_flat(mode) else args.sweep)
    for swept in [mode] + ([STAGE1] if mode == RECIPE else []):
      result["sweeps"][swept] = sweep(args, swept, coeffs)["rows"]
    out.write_text(json.dumps(result, indent=2) + "\n")
  anytime_modes = [m for m in modes
                   if m in ("anytime", RECIPE) or (m.startswith("s2_") and m != CONTROL)]
  lead = args.fixed_length_mode or (anytime_modes[0] if anytime_modes else "none")
  if lead != "none":  # one anytime mode stands for the fixed-length and cache checks
    result["fixed_length"] = {
        "mode": lead,
        "note": f"every example padded to max_len {args.max_len} (the paper's setting); these "
                "gains include eliminating padding",
        "rows": fixed_length_sweep(args.root / lead, args.sweep, args.repeats)}
    if not args.skip_timing:
      result["train_step_time"] = step_time_ratio(args, anytime_modes)
      result["executable_cache"] = cache_check(args, lead, args.sweep)
  out.write_text(json.dumps(result, indent=2) + "\n")
  metric = next(k for k in ("accuracy", "pearson", "mcc") if k in result["sweeps"][modes[0]][0])
  curves = {m: r for m, r in result["sweeps"].items() if m in LABELS or m.startswith("s2_")}
  if curves:
    plot({**result, "sweeps": curves}, metric, out.with_suffix(".png"))
  print(markdown(result, metric))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
