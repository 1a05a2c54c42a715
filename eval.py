"""Evaluate a trained workdir at any speedup coefficient, with no retraining.

    python eval.py --workdir=DIR --coeff 0.9
    python eval.py --workdir=DIR --coeff 0.8,0.85,0.9,1.0,1.2
    python eval.py --workdir=DIR --speedup 2.5            # per bucket, the largest k reaching 2.5x (eq. 7)
    python eval.py --workdir=DIR --calibrate --batch_size 8   # time a grid of schedules on this device
    python eval.py --workdir=DIR --latency_ms 20 --batch_size 8  # the least elimination within 20 ms
    python eval.py --workdir=LM_DIR --coeff 0.8,0.9,1.0 [--lambada=FILE.jsonl]  # an LM: perplexity
    python eval.py --config=flan_t5_mmlu --config.model=DIR --coeff 0.9 [--out DIR]  # few-shot T5,
                                                                  # training-free: no workdir
    python eval.py --config=smollm2_text --coeff 1.0,0.9,0.8   # a pretrained Llama (GGUF):
                                                               # continuation NLL, no workdir

Compiled executables are cached in memory and on disk (``DIR/xla_cache`` by
default), keyed by the keep-count schedule, so a second run skips compiling.
A latency budget uses the calibration table of this device and batch size
(``DIR/calibration_<device>_b<batch>.json``); ``--calibrate --latency_ms``
measures it first in the same run.
"""

import argparse
from pathlib import Path

from latadj_jax.runtime import cli, config_lib


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default=None,
                 help="a training workdir (train.py --workdir); or give --config=NAME instead")
  target = p.add_mutually_exclusive_group()
  target.add_argument("--coeff", default=None, help="k, or a comma list to sweep: 0.8,0.9,1.0 (default 1.0)")
  target.add_argument("--speedup", default=None,
                      help="expected (eq. 7) speedup to reach: each bucket gets the largest k that does")
  target.add_argument("--latency_ms", default=None,
                      help="per-batch latency budget: each bucket gets the least elimination that fits "
                           "(needs --calibrate, now or before)")
  p.add_argument("--calibrate", action="store_true",
                 help="measure each bucket's latency at a grid of schedules and store it in the workdir")
  p.add_argument("--calibrate_points", type=int, default=12, help="schedules per bucket to time")
  p.add_argument("--split", default="validation")
  p.add_argument("--batch_size", type=int, default=0, help="default: the run's eval_batch_size")
  p.add_argument("--max_examples", type=int, default=0)
  p.add_argument("--profile", default="", help="'flat' or 'v1,v2,...' to override the stored profile")
  p.add_argument("--cache_dir", default="", help="persistent compilation cache (default WORKDIR/xla_cache)")
  p.add_argument("--repeats", type=int, default=10, help="timed runs per coeff (median)")
  p.add_argument("--lambada", default="", help="language models: a JSONL of {\"text\": ...} passages "
                 "(or a hub id) for last-word accuracy and perplexity")
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  name, overrides, rest = config_lib.split_argv(argv)
  if name is not None:  # a training-free run from a config (few-shot T5): no workdir
    return _evaluate_config(name, overrides, rest)
  args = parse_args(argv)
  if not args.workdir:
    raise ValueError("pass --workdir=DIR (a run trained with train.py) or --config=NAME "
                     "(a training-free few-shot run: flan_t5_mmlu or flan_t5_bbh)")
  from latadj_jax.runtime import workdir as wd
  from latadj_jax.tuning import offline, targets
  # Fail on a bad flag value before any work.
  speedup = None if args.speedup is None else targets.validate_speedup(args.speedup)
  latency = None if args.latency_ms is None else targets.validate_latency_ms(args.latency_ms)
  coeffs = offline.parse_coeffs(args.coeff or "1.0")
  run = wd.load_run(args.workdir)                 # ... and on a workdir with nothing in it
  from latadj_jax.tuning import evaluate
  evaluate.setup_compilation_cache(args.cache_dir or Path(args.workdir) / "xla_cache")
  if run.config.get("task") == "lm":
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
                             time_repeats=args.repeats, cache=cache, **common)
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


def _evaluate_config(name: str, overrides: list[str], argv: list[str]) -> int:
  """Evaluates a training-free config (few-shot T5, LM continuation) at each k; results go to --out or config.workdir."""
  p = argparse.ArgumentParser(description="Training-free evaluation from a config (no workdir).",
                              epilog="Override any config field with --config.FIELD=VALUE.")
  p.add_argument("--coeff", default=None, help="k, or a comma list (default: the config's coeffs)")
  p.add_argument("--out", default="", help="results dir (default: --config.workdir, else workdirs/NAME)")
  p.add_argument("--repeats", type=int, default=0, help="timed runs per schedule (default: config's)")
  args = p.parse_args(argv)
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


if __name__ == "__main__":
  cli.run(main)
