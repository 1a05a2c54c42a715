"""What ``eval.py`` runs once its flags are parsed: a workdir at k, a target or a budget; or a config.

The run kind in the config (``config.run``) chooses: a trained classifier or
language-model workdir goes to ``tuning.offline``; a training-free config
(few-shot T5, causal-LM continuation or few-shot letters) to its ``tasks``
harness, which ``run_harness`` sweeps.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from latadj_jax.runtime import config_lib


def evaluate_workdir(args: argparse.Namespace) -> int:
  """Evaluates ``args.workdir`` at ``args.coeff``, a ``--speedup`` or a ``--latency_ms`` budget."""
  from latadj_jax.runtime import workdir as wd
  from latadj_jax.runtime import xla_cache
  from latadj_jax.tuning import offline, targets
  # Fail on a bad flag value before any work.
  speedup = None if args.speedup is None else targets.validate_speedup(args.speedup)
  latency = None if args.latency_ms is None else targets.validate_latency_ms(args.latency_ms)
  coeffs = offline.parse_coeffs(args.coeff or "1.0")
  if args.dtype and (speedup is not None or latency is not None or args.calibrate):
    raise ValueError("--dtype applies to a --coeff sweep; --speedup, --latency_ms and --calibrate "
                     "use the run's dtype")
  run = wd.load_run(args.workdir)                 # ... and on a workdir with nothing in it
  xla_cache.setup_compilation_cache(args.cache_dir or Path(args.workdir) / "xla_cache")
  evaluators = {"classifier": _evaluate_classifier, "lm": _evaluate_lm}  # by config.run
  return evaluators[wd.run_kind(run.config, tuple(evaluators))](args, coeffs, speedup, latency)


def _evaluate_classifier(args: argparse.Namespace, coeffs: list[float], speedup: float | None,
                         latency: float | None) -> int:
  """Evaluates a classifier workdir at k, a speedup target or a latency budget."""
  from latadj_jax.runtime.executables import ExecutableCache
  from latadj_jax.tuning import offline
  common = dict(batch_size=args.batch_size, profile=args.profile)
  if speedup is not None or (latency is not None and not args.calibrate):
    # ... and on an unreachable target or a missing calibration, before the model loads.
    offline.choose(args.workdir, speedup=speedup, latency_ms=latency, **common)
  cache = ExecutableCache()
  if args.calibrate:
    offline.calibrate_workdir(args.workdir, points=args.calibrate_points, repeats=args.repeats,
                              cache=cache, **common)
    if args.coeff is None and speedup is None and latency is None:
      return 0
  if speedup is not None or latency is not None:
    offline.evaluate_target(args.workdir, speedup=speedup, latency_ms=latency, split=args.split,
                            max_examples=args.max_examples, time_repeats=args.repeats, cache=cache,
                            **common)
  else:
    offline.evaluate_workdir(args.workdir, coeffs, split=args.split, max_examples=args.max_examples,
                             time_repeats=args.repeats, cache=cache, dtype=args.dtype, **common)
  return 0


def _evaluate_lm(args: argparse.Namespace, coeffs: list[float], speedup: float | None,
                 latency: float | None) -> int:
  """Evaluates a language-model workdir: survivor perplexity (and last-word scores) per k."""
  if speedup is not None or latency is not None or args.calibrate:
    raise ValueError("--speedup, --latency_ms and --calibrate are for classifiers; "
                     "evaluate a language model with --coeff")
  if args.dtype:
    raise ValueError("--dtype is for classifier workdirs; a language model evaluates in its run's dtype")
  from latadj_jax.tuning import offline
  offline.evaluate_lm_workdir(args.workdir, coeffs, split=args.split, batch_size=args.batch_size,
                           max_examples=args.max_examples, profile=args.profile,
                           time_repeats=args.repeats, lambada=args.lambada)
  return 0


def evaluate_config(name: str, overrides: list[str], args: argparse.Namespace) -> int:
  """Evaluates a training-free config (few-shot T5, LM continuation) at each k; results go to --out or config.workdir."""
  config = config_lib.override(config_lib.load(name), overrides)
  # config.run -> its harness in latadj_jax.tasks: continuation NLL, few-shot T5, few-shot letters.
  harnesses = {"continuation": "continuation", "fewshot": "fewshot", "fewshot_lm": "fewshot_lm"}
  if config.run not in harnesses:
    raise config_lib.ConfigError(f"config {name!r} needs training: python train.py --config={name}, "
                                 f"then python eval.py --workdir=DIR")
  from latadj_jax.tuning import offline
  coeffs = offline.parse_coeffs(args.coeff) if args.coeff else list(config.coeffs)
  harness = importlib.import_module(f"latadj_jax.tasks.{harnesses[config.run]}")
  run_harness(config, harness, coeffs, out=args.out, time_repeats=args.repeats)
  return 0


def run_harness(config, harness, coeffs, out: str = "", time_repeats: int = 0) -> dict:
  """Returns the results of a training-free sweep (a ``tasks`` harness), printing the table and
  writing the harness's results file (and its per-item predictions) to ``out``."""
  import jax

  from latadj_jax.runtime import timing
  from latadj_jax.runtime import workdir as wd
  from latadj_jax.tuning import profiles, sweep
  ev, meta = harness.prepare(config)
  spec = config.get("profile", "flat")
  ep, prof = profiles.resolve(spec, ev.model, ev.params,
                              lambda: ev.acc_batches(config.profile_batches),
                              config.get("profile_degree", 2))
  rows = sweep.sweep(ev, sweep.plans(coeffs, ep), repeats=time_repeats or config.time_repeats)
  items = getattr(ev, "ITEM_KEYS", ())
  result = {**meta, "device": timing.device_name(), "jax_version": jax.__version__,
            "main_bucket": rows[0]["main_bucket"], "profile_spec": spec, "profile": list(ep),
            "measured_profile": prof.to_json() if prof else None, "config": config.to_dict(),
            "rows": [{k: v for k, v in r.items() if k not in items} for r in rows]}
  out_dir = Path(out or config.get("workdir") or Path("workdirs") / config.get("name", config.run))
  wd.write_json(out_dir / harness.RESULTS, result)
  if items:
    ev.write_items(out_dir, rows)
  print(f"{meta.get('benchmark', meta.get('task', config.run))}: {config.model}, "
        f"{result['device']}; main bucket {result['main_bucket']}")
  print(sweep.format_table(rows, ev.metrics))
  print(f"wrote {out_dir / harness.RESULTS}")
  return result
