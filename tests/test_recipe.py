"""The recipe train.py runs (latadj_jax/training/recipe.py): two stages into one workdir, or one."""

import json

import jax
import numpy as np
import pytest

from latadj_jax.runtime import workdir as wd
from latadj_jax.training import classifier, profiling, recipe

from conftest import tiny_config


def two_stage_config(model_dir, data_dir, **overrides):
  """Returns the tiny config under the two-stage recipe: 1 + 1 epochs, students at k 0.6 and 1."""
  config = tiny_config(model_dir, data_dir, **{"recipe": "two_stage", "num_epochs": 1, **overrides})
  config.stage2.update(dict(num_epochs=1, train_coeffs="0.6,1.0", select_coeffs="0.6,1.0",
                            eval_every=0))
  return config


def test_single_is_the_config_as_given(tiny_model_dir, tiny_sst2_dir, tmp_path):
  config = tiny_config(tiny_model_dir, tiny_sst2_dir, recipe="single")
  assert recipe.stages(config, tmp_path) == [("train", config, tmp_path)]


def test_two_stage_trains_stage1_flat_then_stage2_from_it(tiny_model_dir, tiny_sst2_dir, tmp_path):
  config = two_stage_config(tiny_model_dir, tiny_sst2_dir, coeff=0.8, train_coeffs="0.9,1.0")
  (label1, one, dir1), (label2, two, dir2) = recipe.stages(config, tmp_path)
  assert (dir1, dir2) == (tmp_path / "stage1", tmp_path)
  assert "stage 1" in label1 and "stage 2" in label2
  # Stage 1: no elimination, nothing anytime, whatever the config says of k.
  assert (one.coeff, one.profile, one.train_coeffs, one.select_coeffs, one.init_from) == \
         (1.0, "flat", "", "", "")
  assert (one.num_epochs, one.learning_rate) == (config.num_epochs, config.learning_rate)
  # Stage 2: the stage2 group over the config, from stage 1's workdir.
  assert two.init_from == str(tmp_path / "stage1")
  assert (two.train_coeffs, two.profile, two.select_coeffs) == ("0.6,1.0", "flat", "0.6,1.0")
  assert two.coeff == 0.8 and two.teacher == config.teacher
  assert config.train_coeffs == "0.9,1.0"  # the caller's config is not changed


@pytest.mark.parametrize("fields, match", [
    (dict(recipe="three"), "one of single, two_stage"),
    (dict(init_from="/some/run"), "--config.recipe=single"),
])
def test_bad_recipes_name_the_fix(tiny_model_dir, tiny_sst2_dir, tmp_path, fields, match):
  config = two_stage_config(tiny_model_dir, tiny_sst2_dir, **fields)
  with pytest.raises(ValueError, match=match):
    recipe.stages(config, tmp_path)


def test_two_stage_without_students_names_the_field(tiny_model_dir, tiny_sst2_dir, tmp_path):
  config = two_stage_config(tiny_model_dir, tiny_sst2_dir)
  config.stage2.train_coeffs = ""
  with pytest.raises(ValueError, match="stage2.train_coeffs"):
    recipe.stages(config, tmp_path)


def test_stage2_fails_before_stage1_runs(tiny_model_dir, tiny_sst2_dir, tmp_path):
  config = two_stage_config(tiny_model_dir, tiny_sst2_dir, distill="hidden", teacher="largest")
  with pytest.raises(ValueError, match="distill=hidden"):
    recipe.stages(config, tmp_path)
  config = two_stage_config(tiny_model_dir, tiny_sst2_dir)
  with config.stage2.unlocked():
    config.stage2.learning_rat = 1e-5
  with pytest.raises(ValueError, match="stage2.learning_rat is not a config field"):
    recipe.stages(config, tmp_path)


def final_params(workdir, config):
  pre, _, _ = profiling.load_model_and_task(config)
  return wd.restore_params(workdir, pre.params)


@pytest.mark.slow
def test_both_stages_run_and_a_kill_between_them_resumes_to_the_same_model(
    tiny_model_dir, tiny_sst2_dir, tmp_path, capsys):
  config = two_stage_config(tiny_model_dir, tiny_sst2_dir)
  whole = tmp_path / "whole"
  recipe.train(config, whole, classifier.train_and_evaluate)
  out = capsys.readouterr().out
  assert "stage 1/2 (no elimination) -> " in out and "stage 2/2 (every k): step" in out
  for d in (whole / "stage1", whole):
    assert (d / wd.COMPLETE).exists()
  assert json.loads((whole / "stage1" / wd.PROFILE).read_text())["ep"] == [1.0] * 3  # 3 layers
  best = wd.load_best(whole)  # stage 2 chose its checkpoint by the mean over its k grid
  assert set(best["metrics"]) >= {"accuracy@0.6", "accuracy@1", "mean_over_k"}

  # Killed after stage 1 finished, before stage 2 wrote anything; then rerun.
  killed = tmp_path / "killed"
  def die_at_stage2(stage_config, stage_dir):
    if stage_dir == killed:
      raise KeyboardInterrupt
    return classifier.train_and_evaluate(stage_config, stage_dir)
  with pytest.raises(KeyboardInterrupt):
    recipe.train(config, killed, die_at_stage2)
  assert (killed / "stage1" / wd.COMPLETE).exists() and not (killed / wd.COMPLETE).exists()
  recipe.train(config, killed, classifier.train_and_evaluate)
  assert "stage 1/2 (no elimination): finished" in capsys.readouterr().out
  (a, step_a), (b, step_b) = final_params(whole, config), final_params(killed, config)
  assert step_a == step_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
