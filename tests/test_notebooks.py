"""The notebooks run top to bottom with their small defaults and write readable figures (issue 8).

Each notebook is executed with nbclient in ``notebooks/`` (imports and relative paths as a user
sees them), with ``LATADJ_NOTEBOOK_OUT`` pointing its PNGs (and 02's short training run) at a
temporary directory. Any cell that raises fails the test.
"""

import os
from pathlib import Path

import nbformat
import pytest
from matplotlib import image as mpimg
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# The figures each notebook must write, as named in its cells.
EXPECTED_PNGS = {
    "01_acc_analysis.ipynb": ("fig3_score_vectors.png", "fig4_acc_profile.png"),
    "02_offline_tuning.ipynb": ("fig6_offline_tuning.png",),
    "03_generation.ipynb": ("generation_ttft.png",),
}
CELL_TIMEOUT_S = 900  # one cell; 02's training cell is the longest


def run_notebook(nb: nbformat.NotebookNode, cwd: Path, out_dir: Path) -> nbformat.NotebookNode:
  """Returns ``nb`` executed top to bottom; raises CellExecutionError at the first cell that raises."""
  env = {**os.environ, "LATADJ_NOTEBOOK_OUT": str(out_dir), "HF_HUB_OFFLINE": "1"}
  env.pop("LATADJ_WORKDIR", None)  # 02 must take its own small default, not a user's run
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}})
  return client.execute(env=env)


def test_every_notebook_is_covered():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED_PNGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_PNGS))
def test_notebook_runs_and_writes_its_figures(name, tmp_path):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  run_notebook(nb, NOTEBOOKS, tmp_path)
  for png in EXPECTED_PNGS[name]:
    path = tmp_path / png
    assert path.is_file(), f"{name} did not write {png}"
    assert path.stat().st_size > 15_000, f"{png} is suspiciously small"
    pixels = mpimg.imread(path)[..., :3]
    height, width = pixels.shape[:2]
    assert height >= 300 and width >= 500, f"{png} is only {width}x{height}"
    drawn = (pixels < 0.9).any(axis=-1).mean()  # share of non-white pixels: lines, text, bars
    assert drawn > 0.03, f"{png} is nearly blank ({drawn:.1%} drawn)"


def test_committed_notebooks_carry_no_outputs():
  # Outputs are machine-specific (timings, paths) and large (images); CI re-executes anyway.
  for name in EXPECTED_PNGS:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name} has outputs; strip them"


@pytest.mark.slow
def test_a_raising_cell_fails_the_run(tmp_path):
  marker = tmp_path / "after.txt"
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("x = 1"),
      nbformat.v4.new_code_cell("raise RuntimeError('boom in cell 2')"),
      nbformat.v4.new_code_cell(f"open({str(marker)!r}, 'w').write('ran')"),
  ])
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  with pytest.raises(CellExecutionError, match="boom in cell 2"):
    run_notebook(nb, tmp_path, tmp_path)
  assert not marker.exists(), "cells after the failing one must not run"


@pytest.mark.slow
def test_a_raising_cell_in_a_real_notebook_fails_the_run(tmp_path):
  # The first notebook with an error right after its settings cell: the runner must stop there.
  nb = nbformat.read(NOTEBOOKS / "01_acc_analysis.ipynb", as_version=4)
  settings = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
  nb.cells.insert(settings + 1, nbformat.v4.new_code_cell("assert OUT_DIR.name == 'nope', OUT_DIR"))
  with pytest.raises(CellExecutionError, match="AssertionError"):
    run_notebook(nb, NOTEBOOKS, tmp_path)
  assert not list(tmp_path.glob("*.png"))
