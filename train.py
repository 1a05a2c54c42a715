"""Fine-tune with Sort+Eliminate layers.

    python train.py --config=glue_sst2 [--workdir=DIR] [--config.coeff=0.9 ...]

This file is intentionally short: the loop lives in ``latadj_jax.training``.
"""

import argparse
import importlib
from pathlib import Path

from latadj_jax.runtime import cli, config_lib

# config.run -> its trainer in latadj_jax.training: causal LMs train on their survivors'
# next-token loss, classifiers on the labels.
TRAINERS = {"classifier": "classifier", "lm": "lm"}


def main(argv: list[str]) -> int:
  name, overrides, rest = config_lib.split_argv(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   epilog="Override any config field with --config.FIELD=VALUE.")
  parser.add_argument("--workdir", default=None, help="default: workdirs/<config name>")
  args = parser.parse_args(rest)
  if name is None:
    raise config_lib.ConfigError(
        f"pass --config=NAME; available: {', '.join(config_lib.available())}")
  config = config_lib.override(config_lib.load(name), overrides)
  if config.run not in TRAINERS:
    raise config_lib.ConfigError(f"config {name!r} is a training-free {config.run} run: "
                                 f"python eval.py --config={name}")
  workdir = Path(args.workdir or Path("workdirs") / config.name)
  print(f"workdir: {workdir}")
  # After the argument checks: importing JAX takes seconds.
  from latadj_jax.runtime import hub, xla_cache
  from latadj_jax.training import recipe
  trainer = importlib.import_module(f"latadj_jax.training.{TRAINERS[config.run]}")
  xla_cache.setup_from_config(config.get("compilation_cache", "default"))
  log = xla_cache.compile_log()
  try:
    recipe.train(config, workdir, trainer.train_and_evaluate)
    print(log)
  except hub.HubError as e:  # a bad local file or path raises another error, naming its fix
    raise type(e)(f"{e}\nFor a fully offline run, pass local weights and data: "
                  f"python train.py --config={config.name} --config.model=DIR "
                  f"--config.data_dir=DIR, or try python train.py --config=quickstart") from None
  return 0


if __name__ == "__main__":
  cli.run(main)
