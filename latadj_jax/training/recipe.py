"""The recipe ``train.py`` runs: one stage, or two stages into one workdir.

``config.recipe`` is "single" (train once with the config as given) or
"two_stage", the recipe the README measures (one model for every k):

1. ``WORKDIR/stage1``: fine-tune without elimination (k = 1, flat profile), the
   config's epochs and learning rate;
2. ``WORKDIR``: start from stage 1's parameters (``init_from``) and train with
   the config's fields overridden by the group ``config.stage2`` (its students'
   k, epochs, learning rate, checkpoint choice). ``eval.py`` and ``serve.py``
   read this workdir.

Each stage resumes from its own checkpoints, and a finished stage (its
``complete.json``) is not rerun, so a kill anywhere, the boundary included,
resumes to the same parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import ml_collections

from latadj_jax.core import schedule
from latadj_jax.runtime import workdir as wd
from latadj_jax.training import anytime

RECIPES = ("single", "two_stage")
STAGE1 = "stage1"  # stage 1's workdir, inside the final one
# Stage 1 trains without elimination whatever the config says of k: it is the flat baseline
# stage 2 starts from, and what the anytime model is measured against.
STAGE1_FIELDS = dict(coeff=1.0, profile="flat", train_coeffs="", select_coeffs="", init_from="",
                     eval_every=0)


def stages(config: ml_collections.ConfigDict, workdir: Path) -> list[tuple[str, ml_collections.ConfigDict, Path]]:
  """Returns the recipe's stages in order: (label, that stage's config, its workdir)."""
  recipe = config.get("recipe", "single")
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; --config.recipe is one of {', '.join(RECIPES)}")
  workdir = Path(workdir)
  if recipe == "single":
    return [("train", config, workdir)]
  if config.get("init_from"):
    raise ValueError("--config.init_from starts a single stage from a trained workdir: "
                     "add --config.recipe=single (two_stage trains its own stage 1)")
  stage2 = config.stage2.to_dict()
  if not stage2.get("train_coeffs", config.get("train_coeffs")):
    raise ValueError("recipe two_stage needs the students' k in --config.stage2.train_coeffs "
                     "(e.g. 0.6,0.7,0.8,0.9,1.0), or --config.recipe=single")
  one = _with(config, {**STAGE1_FIELDS, "stage": "stage 1/2 (no elimination)"})
  two = _with(config, {**stage2, "init_from": str(workdir / STAGE1),
                       "stage": "stage 2/2 (every k)"})
  # Stage 2's fields fail now, not after stage 1's hours.
  schedule.validate_coeff(two.coeff)
  anytime.spec_from_config(two)
  return [(one.stage, one, workdir / STAGE1), (two.stage, two, workdir)]


def _with(config: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  """Returns a copy of ``config`` with ``fields`` set (``stage`` added)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in fields.items():
    if key not in config and key != "stage":
      raise ValueError(f"config.stage2.{key} is not a config field; stage 2 overrides the "
                       f"config's own fields")
    out[key] = tuple(value) if isinstance(config.get(key), tuple) else value
  out.lock()
  return out


def train(config: ml_collections.ConfigDict, workdir: Path, train_stage: Callable) -> dict:
  """Runs each stage with ``train_stage(config, workdir)``, skipping finished ones; returns the last's metrics."""
  metrics: dict = {}
  runs = stages(config, workdir)
  for label, stage_config, stage_dir in runs:
    if len(runs) > 1:
      if (stage_dir / wd.COMPLETE).exists():
        print(f"{label}: finished in {stage_dir}, not rerun")
        continue
      print(f"{label} -> {stage_dir}", flush=True)
    metrics = train_stage(stage_config, stage_dir)
  return metrics
