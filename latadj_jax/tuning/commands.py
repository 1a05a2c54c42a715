"""What ``eval.py`` runs once its flags are parsed: a workdir at k, a target or a budget; or a config.

A trained classifier workdir goes to ``tuning.offline``, a language-model
workdir to ``tasks.lm_eval``; a training-free config (few-shot T5, causal-LM
continuation or few-shot letters) to its ``tasks`` harness.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latadj_jax.runtime import config_lib


def evaluate_workdir(args: argparse.Namespace) -> int:
  """Evaluates ``args.workdir`` at ``args.coeff``, a ``--speedup`` or a ``--latency_ms`` budget."""
  from latadj_jax.runtime import workdir as wd
  from latadj_jax.runtime import xla_cache
  from latadj_jax.tuning import evaluate, offline, targets
  # Fail on a bad flag value before any work.
  speedup = None if args.speedup is None else targets.validate_speedup(args.speedup)
  latency = None if args.latency_ms is None else targets.validate_latency_ms(args.latency_ms)
  coeffs = offline.parse_coeffs(args.coeff or "1.0")
  if args.dtype and (speedup is not None or latency is not None or args.calibrate):
    raise ValueError("--dtype applies to a --coeff sweep; --speedup, --latency_ms and --calibrate "
                     "use the run's dtype")
  run = wd.load_run(args.workdir)                 # ... and on a workdir with nothing in it
  xla_cache.setup_compilation_cache(args.cache_dir or Path(args.workdir) / "xla_cache")
  if run.config.get("task") == "lm":
    if args.dtype:
      raise ValueError("--dtype is for classifier workdirs; a language model evaluates in its run's dtype")
    return _evaluate_lm(args, coeffs)
  common = dict(batch_size=args.batch_size, profile=args.profile)
  if speedup is not None or (latency is not None and not args.calibrate):
    # ... and on an unreachable target or a missing calibration, before the model loads.
    offline.choose(args.workdir, speedup=speedup, latency_ms=latency, **common)
  cache = evaluate.ExecutableCache()
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


def _evaluate_lm(args: argparse.Namespace, coeffs: list[float]) -> int:
  """Evaluates a language-model workdir: survivor perplexity (and last-word scores) per k."""
  if args.speedup is not None or args.latency_ms is not None or args.calibrate:
    raise ValueError("--speedup, --latency_ms and --calibrate are for classifiers; "
                     "evaluate a language model with --coeff")
  from latadj_jax.tasks import lm_eval
  lm_eval.evaluate_workdir(args.workdir, coeffs, split=args.split, batch_size=args.batch_size,
                           max_examples=args.max_examples, profile=args.profile,
                           time_repeats=args.repeats, lambada=args.lambada)
  return 0


def evaluate_config(name: str, overrides: list[str], args: argparse.Namespace) -> int:
  """Evaluates a training-free config (few-shot T5, LM continuation) at each k; results go to --out or config.workdir."""
  config = config_lib.override(config_lib.load(name), overrides)
  from latadj_jax.tuning import offline
  coeffs = offline.parse_coeffs(args.coeff) if args.coeff else None
  if config.get("task") == "continuation":  # a pretrained causal LM: continuation NLL per k
    from latadj_jax.tasks import continuation
    continuation.evaluate_config(config, coeffs, out=args.out, time_repeats=args.repeats)
    return 0
  if config.get("task") == "fewshot_lm":  # a pretrained causal LM: few-shot letters per k
    from latadj_jax.tasks import fewshot_lm
    fewshot_lm.evaluate_config(config, coeffs, out=args.out, time_repeats=args.repeats)
    return 0
  if "benchmark" not in config:
    raise config_lib.ConfigError(f"config {name!r} needs training: python train.py --config={name}, "
                                 f"then python eval.py --workdir=DIR")
  from latadj_jax.tasks import fewshot
  fewshot.evaluate_config(config, coeffs, out=args.out, time_repeats=args.repeats)
  return 0
