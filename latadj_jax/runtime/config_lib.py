"""Run configs: resolve ``--config=glue_sst2`` to ``configs/glue_sst2.py`` and apply overrides."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
  """A config name, file or override is wrong; the message says how to fix it."""


def available(config_dir: Path = CONFIG_DIR) -> list[str]:
  """Returns the names of the runnable configs (files with ``get_config``)."""
  return sorted(p.stem for p in config_dir.glob("*.py")
                if not p.stem.startswith("_") and "def get_config" in p.read_text())


def resolve(name_or_path: str, config_dir: Path = CONFIG_DIR) -> Path:
  """Returns the config file for a bare name (``glue_sst2``) or a path."""
  path = Path(name_or_path).expanduser()
  if path.suffix == ".py" and path.is_file():
    return path.resolve()
  candidate = config_dir / f"{name_or_path}.py"
  if candidate.is_file():
    return candidate
  raise ConfigError(f"unknown config {name_or_path!r}. Available: "
                    f"{', '.join(available(config_dir))} (or pass a path to a .py file)")


def load(name_or_path: str) -> ml_collections.ConfigDict:
  """Returns ``get_config()`` of the named config file, with ``config.name`` set."""
  path = resolve(name_or_path)
  # Configs import their base as ``from configs import default``.
  root = str(path.parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_latadj_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    config.name = path.stem
  return config


def _coerce(text: str, current: Any) -> Any:
  """Returns ``text`` parsed to the type of the field's current value."""
  if isinstance(current, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected true or false, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    value = ast.literal_eval(text if text.strip().startswith(("(", "[")) else f"({text},)")
    return type(current)(value)
  return text


def override(config: ml_collections.ConfigDict, assignments: Sequence[str]) -> ml_collections.ConfigDict:
  """Returns ``config`` with ``field=value`` (or ``a.b=value``) assignments applied."""
  for item in assignments:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} needs a value: --config.{key}=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"unknown config field {key!r}; fields: {', '.join(sorted(node.keys()))}")
    try:
      value = _coerce(text, node[leaf])
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f"bad value for --config.{key}: {e}") from None
    with node.ignore_type():
      node[leaf] = value
  return config


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """Returns ``(config name, overrides, other args)`` from a command line."""
  name, overrides, rest = None, [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg in ("--config", "-c") and args:
      name = args.pop(0)
    elif arg.startswith("--config="):
      name = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return name, overrides, rest
