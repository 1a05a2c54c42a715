"""Run configs: every config loads locked, overrides parse to their field's type, a typo names the nearest field."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from absl import flags
import pytest

from latadj_jax.runtime import config_lib

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", config_lib.available())
def test_every_config_loads_locked(name):
  config = config_lib.load(name)
  assert config.name == name and config.is_locked
  with pytest.raises(AttributeError, match="locked"):
    config.no_such_field = 1
  with config.unlocked():  # code that adds a field says so
    config.no_such_field = 1


def test_helpers_are_not_configs():
  assert {"sections", "assets", "__init__"}.isdisjoint(config_lib.available())


def test_configs_compose_sections_and_import_no_private_helper():
  for path in sorted((REPO / "configs").glob("*.py")):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("configs"):
        assert not any(a.name.startswith("_") for a in node.names), (path.name, ast.dump(node))
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        assert not (node.attr.startswith("_") and (REPO / "configs" / f"{node.value.id}.py").exists()), \
            f"{path.name} uses {node.value.id}.{node.attr}"
      assert not isinstance(node, ast.Delete), f"{path.name} deletes fields: build up, don't cut down"


def _error(name, *assignments) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.override(config_lib.load(name), assignments)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_misspelt_field_names_the_nearest_in_one_line():
  message = _error("glue_sst2", "coef=0.9")
  assert message.startswith("unknown config field 'coef' (did you mean 'coeff'?); fields: ")
  assert "learning_rate" in message
  assert "did you mean 'survivors'" in _error("smollm2_text", "survivor=last")


def test_misspelt_nested_field_names_the_nearest_in_one_line():
  message = _error("lm_text", "gpt2.n_layr=2")
  assert message == ("unknown config field 'gpt2.n_layr' (did you mean 'gpt2.n_layer'?); "
                     "fields of gpt2: n_embd, n_head, n_layer, n_positions")
  assert "did you mean 'gpt2.n_layer'" in _error("lm_text", "n_layer=2")  # forgot the group
  assert "'coeff' is a float, not a group" in _error("lm_text", "coeff.x=1")


def test_overrides_parse_to_each_fields_type():
  config = config_lib.override(config_lib.load("lm_text"), [
      "progress=false", "student_dropout=0", "max_steps=5", "coeff=1", "learning_rate=5e-5",
      "eval_coeffs=0.8,0.9", "buckets=(16,)", "profile=0.9,0.8", "teacher=", "anytime_always=",
      "gpt2.n_layer=2", "max_steps=7"])
  assert config.progress is False and config.student_dropout is False
  assert config.max_steps == 7 and isinstance(config.max_steps, int)  # the last one wins
  assert config.coeff == 1.0 and isinstance(config.coeff, float) and config.learning_rate == 5e-5
  assert config.eval_coeffs == (0.8, 0.9) and config.buckets == (16,)
  assert config.profile == "0.9,0.8" and config.teacher == "" and config.anytime_always == ""
  assert config.gpt2.n_layer == 2 and config.is_locked
  assert config_lib.override(config_lib.load("lm_text"), ["eval_coeffs="]).eval_coeffs == ()
  tasks = config_lib.override(config_lib.load("flan_t5_mmlu"), ["tasks='anatomy','virology'"])
  assert tasks.tasks == ("anatomy", "virology")
  assert not any(name.startswith("config") for name in flags.FLAGS)  # parsed on a private FlagValues


def test_bad_values_are_one_line_errors():
  assert _error("glue_sst2", "max_steps=abc").startswith("bad value for --config.max_steps=abc:")
  assert "--config.progress=maybe" in _error("glue_sst2", "progress=maybe")
  assert "needs a value" in _error("glue_sst2", "coeff")


def test_unknown_config_name_lists_the_available_ones():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load("glue_sst3")
  assert "did you mean 'glue_sst2'?" in str(e.value)
  assert all(name in str(e.value) for name in config_lib.available())


def test_split_argv_separates_the_config_its_overrides_and_the_rest():
  assert config_lib.split_argv(["--config=glue_sst2", "--config.coeff=0.9", "--workdir=w"]) == (
      "glue_sst2", ["coeff=0.9"], ["--workdir=w"])
  assert config_lib.split_argv(["-c", "lm_text", "--coeff", "0.9"]) == ("lm_text", [], ["--coeff", "0.9"])


@pytest.mark.parametrize("command", [["train.py", "--config=quickstart", "--config.coef=0.9"],
                                     ["eval.py", "--config=smollm2_text", "--config.survivor=last"]])
def test_cli_typo_fails_fast_in_one_line(command):
  proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: unknown config field") and "(did you mean " in line
