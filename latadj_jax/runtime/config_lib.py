"""Run configs: resolve ``--config=glue_sst2`` to ``configs/glue_sst2.py`` and apply overrides."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

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
  names = available(config_dir)
  near = difflib.get_close_matches(name_or_path, names, n=1)
  hint = f" (did you mean {near[0]!r}?)" if near else ""
  raise ConfigError(f"unknown config {name_or_path!r}{hint}. Available: "
                    f"{', '.join(names)} (or pass a path to a .py file)")


def load(name_or_path: str) -> ml_collections.ConfigDict:
  """Returns ``get_config()`` of the named config file, with ``config.name`` set, locked.

  Locked: setting a field the config lacks raises, so a misspelt field fails where it is
  set; code that adds a field wraps it in ``with config.unlocked():``.
  """
  path = resolve(name_or_path)
  # Configs import their base and their sections as ``from configs import ...``.
  root = str(path.parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_latadj_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    config.name = path.stem
  config.lock()
  return config


def _paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Returns every field's dotted path, groups (``gpt2``) and their fields (``gpt2.n_layer``) alike."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _paths(value, f"{prefix}{key}.")
  return out


def _check_field(config: ml_collections.ConfigDict, key: str) -> Any:
  """Returns the current value of the dotted field ``key``; raises a one-line ConfigError naming the nearest."""
  node, seen = config, []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config field {'.'.join(seen)!r} is a {type(node).__name__}, not a group "
                        f"of fields: no --config.{key}")
    if part not in node:
      near = difflib.get_close_matches(key, _paths(config), n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      where = f" of {'.'.join(seen)}" if seen else ""
      raise ConfigError(f"unknown config field {key!r}{hint}; fields{where}: "
                        f"{', '.join(sorted(node.keys()))}")
    node = node[part]
    seen.append(part)
  return node


def override(config: ml_collections.ConfigDict, assignments: Sequence[str]) -> ml_collections.ConfigDict:
  """Returns ``config`` with ``field=value`` (or ``a.b=value``) assignments applied, each parsed to its field's type.

  ``ml_collections.config_flags`` parses and assigns them, on a private ``FlagValues``
  (absl's global FLAGS stays untouched): bool ``true/false/1/0``, int, float, str, a
  tuple as ``0.8,0.9`` or ``(0.8, 0.9)``, a group as a dict literal. It locks ``config``.
  """
  argv = ["override"]
  for item in assignments:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} needs a value: --config.{key}=VALUE")
    if isinstance(_check_field(config, key), tuple) and not text.strip():
      text = "()"  # config_flags would read an empty value as ("",)
    argv.append(f"--config.{key}={text}")
  flag_values = flags.FlagValues()
  try:
    holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values,
                                             sys_argv=argv, lock_config=True)
    flag_values(argv)
  except flags.Error as e:
    message = " ".join(str(e).split())  # one line
    if message.startswith("flag "):  # absl: "flag --config.x=v: why"
      raise ConfigError("bad value for " + message.removeprefix("flag ")) from None
    raise ConfigError(f"bad override: {message}") from None
  return holder.value


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
