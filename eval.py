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
  p.add_argument("--profile", default="", help="'flat', 'step<layer>@<keep>' or 'v1,v2,...' to override the stored profile")
  p.add_argument("--cache_dir", default="", help="persistent compilation cache (default WORKDIR/xla_cache)")
  p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                 help="evaluate in this dtype instead of the run's (-> eval_results_<dtype>.json)")
  p.add_argument("--repeats", type=int, default=10, help="timed runs per coeff (median)")
  p.add_argument("--lambada", default="", help="language models: a JSONL of {\"text\": ...} passages "
                 "(or a hub id) for last-word accuracy and perplexity")
  return p.parse_args(argv)


def parse_config_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description="Training-free evaluation from a config (no workdir).",
                              epilog="Override any config field with --config.FIELD=VALUE.")
  p.add_argument("--coeff", default=None, help="k, or a comma list (default: the config's coeffs)")
  p.add_argument("--out", default="", help="results dir (default: --config.workdir, else workdirs/NAME)")
  p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                 help="evaluate in this dtype instead of the run's (-> eval_results_<dtype>.json)")
  p.add_argument("--repeats", type=int, default=0, help="timed runs per schedule (default: config's)")
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  name, overrides, rest = config_lib.split_argv(argv)
  if name is not None:  # a training-free run from a config (few-shot T5): no workdir
    args = parse_config_args(rest)
    from latadj_jax.tuning import commands
    return commands.evaluate_config(name, overrides, args)
  args = parse_args(argv)
  if not args.workdir:
    raise ValueError("pass --workdir=DIR (a run trained with train.py) or --config=NAME "
                     "(a training-free few-shot run: flan_t5_mmlu or flan_t5_bbh)")
  from latadj_jax.tuning import commands
  return commands.evaluate_workdir(args)


if __name__ == "__main__":
  cli.run(main)
