"""Nothing defaults to a path outside the repository (issue 18): configs' data and models, notebook outputs."""

import os
import site
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from latadj_jax.data import text
from latadj_jax.runtime import config_lib

REPO = Path(__file__).resolve().parents[1]
PATH_FIELDS = ("data_dir", "model", "tokenizer", "lambada")


# Installed packages may hold defaults (quickstart's MiniLM weights come from a pip package).
ALLOWED = [REPO.resolve()] + [Path(p).resolve() for p in site.getsitepackages()]


def _outside_repo(value) -> bool:
  if not isinstance(value, str) or not value.startswith(("/", "~", ".")):
    return False  # empty, a hub id, or a name such as "byte"
  path = Path(value).expanduser().resolve()
  return not any(root in (path, *path.parents) for root in ALLOWED)


@pytest.mark.parametrize("name", config_lib.available())
def test_config_defaults_stay_inside_the_repository(name):
  config = config_lib.load(name)
  outside = {f: config[f] for f in PATH_FIELDS if f in config and _outside_repo(config[f])}
  assert not outside, f"configs/{name}.py defaults to paths outside the repository: {outside}"


def test_lm_text_runs_on_its_shipped_sample():
  config = config_lib.load("lm_text")
  root = Path(config.data_dir)
  assert root.is_dir() and root.resolve().is_relative_to((REPO / "latadj_jax").resolve())
  assert sum(f.stat().st_size for f in root.iterdir()) < 400_000  # a sample, not a corpus
  train, dev = (text.read_local(config.data_dir, s, config.dev_fraction)
                for s in ("train", "validation"))
  assert sum(map(len, train)) > 50_000 and sum(map(len, dev)) > 5_000
  assert "Macbeth" in train[0] and "Scone" in dev[0]  # the play's last line is held out


@pytest.mark.slow
def test_notebooks_write_next_to_themselves_from_any_working_directory(tmp_path):
  # Each notebook's settings cell, run with the kernel in an unrelated directory and no
  # LATADJ_NOTEBOOK_OUT, must point its outputs at notebooks/outputs.
  env = {k: v for k, v in os.environ.items() if k not in ("LATADJ_NOTEBOOK_OUT", "LATADJ_WORKDIR")}
  cells = []
  for path in sorted((REPO / "notebooks").glob("*.ipynb")):
    settings = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert "OUT_DIR" in settings.source, path.name
    cells += [nbformat.v4.new_code_cell(settings.source),
              nbformat.v4.new_code_cell(f"print({path.name!r}, OUT_DIR.resolve())")]
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
  printed = [o["text"].strip() for c in nb.cells for o in c.get("outputs", []) if "text" in o]
  assert len(printed) == 3, printed
  for line in printed:
    assert line.endswith(str((REPO / "notebooks" / "outputs").resolve())), line
  assert not (tmp_path / "outputs").exists()
