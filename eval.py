"""Evaluate a trained workdir at any speedup coefficient, with no retraining.

    python eval.py --workdir=DIR --coeff 0.9
    python eval.py --workdir=DIR --coeff 0.8,0.85,0.9,1.0,1.2
    python eval.py --config=flan_t5_mmlu --config.model=DIR --coeff 0.9 [--out DIR]  # few-shot T5,
                                                                  # training-free: no workdir

Compiled executables are cached in memory and on disk (``DIR/xla_cache`` by
default), keyed by the keep-count schedule, so a second run skips compiling.
"""

import argparse
from pathlib import Path

from latadj_jax import cli, config_lib


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default=None,
                 help="a training workdir (train.py --workdir); or give --config=NAME instead")
  p.add_argument("--coeff", default="1.0", help="k, or a comma list to sweep: 0.8,0.9,1.0")
  p.add_argument("--split", default="validation")
  p.add_argument("--batch_size", type=int, default=0, help="default: the run's eval_batch_size")
  p.add_argument("--max_examples", type=int, default=0)
  p.add_argument("--profile", default="", help="'flat' or 'v1,v2,...' to override the stored profile")
  p.add_argument("--cache_dir", default="", help="persistent compilation cache (default WORKDIR/xla_cache)")
  p.add_argument("--repeats", type=int, default=10, help="timed runs per coeff (median)")
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  name, overrides, rest = config_lib.split_argv(argv)
  if name is not None:  # a training-free run from a config (few-shot T5): no workdir
    return _evaluate_config(name, overrides, rest)
  args = parse_args(argv)
  if not args.workdir:
    raise ValueError("pass --workdir=DIR (a run trained with train.py) or --config=NAME "
                     "(a training-free few-shot run: flan_t5_mmlu or flan_t5_bbh)")
  from latadj_jax import offline, workdir as wd
  coeffs = offline.parse_coeffs(args.coeff)       # fail on a bad coeff before any work
  wd.load_run(args.workdir)                       # ... and on a workdir with nothing in it
  from latadj_jax import evaluate
  evaluate.setup_compilation_cache(args.cache_dir or Path(args.workdir) / "xla_cache")
  offline.evaluate_workdir(args.workdir, coeffs, split=args.split, batch_size=args.batch_size,
                           max_examples=args.max_examples, profile=args.profile,
                           time_repeats=args.repeats)
  return 0


def _evaluate_config(name: str, overrides: list[str], argv: list[str]) -> int:
  """Evaluates a training-free config (few-shot T5) at each k; results go to --out or config.workdir."""
  p = argparse.ArgumentParser(description="Training-free evaluation from a config (no workdir).",
                              epilog="Override any config field with --config.FIELD=VALUE.")
  p.add_argument("--coeff", default=None, help="k, or a comma list (default: the config's coeffs)")
  p.add_argument("--out", default="", help="results dir (default: --config.workdir, else workdirs/NAME)")
  p.add_argument("--repeats", type=int, default=0, help="timed runs per schedule (default: config's)")
  args = p.parse_args(argv)
  config = config_lib.override(config_lib.load(name), overrides)
  if "benchmark" not in config:
    raise config_lib.ConfigError(f"config {name!r} needs training: python train.py --config={name}, "
                                 f"then python eval.py --workdir=DIR")
  from latadj_jax import fewshot, offline
  coeffs = offline.parse_coeffs(args.coeff) if args.coeff else None
  fewshot.evaluate_config(config, coeffs, out=args.out, time_repeats=args.repeats)
  return 0


if __name__ == "__main__":
  cli.run(main)
