"""The package layout's rules, read from the source with ``ast`` (issue 23).

* no import circle between modules (imports inside functions count too: a lazy
  import that dodges a circle at load time is still a circle in the design);
* stages import downwards: core < runtime < data, models < training, tuning,
  tasks, serving (the public ``-m`` shims at the top may import anything);
* tuning, tasks and serving never import training; tasks never import tuning
  (tuning drives a task's evaluation, not the reverse); core imports nothing of
  ours but core; models import only core and runtime;
* no module over 450 lines, none in models/ over 350; ``train.py`` and ``eval.py``
  under 80.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "latadj_jax"
LEVEL = {"core": 0, "runtime": 1, "data": 2, "models": 2,
         "training": 3, "tuning": 3, "tasks": 3, "serving": 3, "": 4}
NEVER = {("tuning", "training"), ("tasks", "training"), ("serving", "training"),
         ("tasks", "tuning")}
ONLY = {"core": {"core"}, "models": {"models", "core", "runtime"}}  # what a stage may import
MAX_LINES = 450
MODELS_MAX_LINES = 350
ENTRY_MAX_LINES = 79  # under 80


def module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
  """Returns the subpackage a module sits in ('' for the top of the package)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LEVEL) else ""


def imports_of(path: Path, modules: set[str]) -> set[str]:
  """Returns the package modules ``path`` imports, anywhere in the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("latadj_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latadj_jax"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m in modules}


def import_graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  modules = set(files)
  # A package's __init__ is its namespace, not a dependency of its modules.
  return {m: {d for d in imports_of(p, modules) if d != m and d != "latadj_jax"}
          for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Returns one circle per strongly connected group of two or more modules (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1 or v in graph.get(v, ()):
        out.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def violations(graph: dict[str, set[str]], sizes: dict[str, int]) -> list[str]:
  """Returns every broken rule, one line each."""
  out = [f"import circle: {' <-> '.join(c)}" for c in cycles(graph)]
  for m, deps in sorted(graph.items()):
    for d in sorted(deps):
      a, b = stage(m), stage(d)
      if a in ONLY and b not in ONLY[a]:
        out.append(f"{m} imports {d}: {a} imports only {', '.join(sorted(ONLY[a]))}")
      elif (a, b) in NEVER:
        out.append(f"{m} imports {d}: {a} never imports {b}")
      elif LEVEL[b] > LEVEL[a] and a != "":
        out.append(f"{m} imports {d}: an arrow pointing up ({a} -> {b})")
  for path, n in sorted(sizes.items()):
    limit = (ENTRY_MAX_LINES if "/" not in path else
             MODELS_MAX_LINES if path.startswith("latadj_jax/models/") else MAX_LINES)
    if n > limit:
      out.append(f"{path} has {n} lines (limit {limit})")
  return out


def sizes() -> dict[str, int]:
  files = [p for p in PACKAGE.rglob("*.py")] + [REPO / "train.py", REPO / "eval.py"]
  return {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in files}


def test_the_package_keeps_its_layout_rules():
  graph = import_graph()
  assert {"latadj_jax.core.schedule", "latadj_jax.training.loop", "latadj_jax.tuning.sweep",
          "latadj_jax.serving.predictor"} <= set(graph)  # the reader sees the real tree
  assert "latadj_jax.core.schedule" in graph["latadj_jax.training.classifier"]
  assert violations(graph, sizes()) == []


@pytest.mark.parametrize("plant, expect", [
    (("latadj_jax.core.schedule", "latadj_jax.runtime.workdir"), "core imports only core"),
    (("latadj_jax.tuning.offline", "latadj_jax.training.loop"), "tuning never imports training"),
    (("latadj_jax.tasks.lm_eval", "latadj_jax.tuning.sweep"), "tasks never imports tuning"),
    (("latadj_jax.models.bert", "latadj_jax.data.pipeline"), "models imports only core, models, runtime"),
    (("latadj_jax.data.pipeline", "latadj_jax.tuning.evaluate"), "pointing up"),
    (("latadj_jax.runtime.workdir", "latadj_jax.tuning.report"), "import circle"),
])
def test_a_planted_violation_is_reported(plant, expect):
  graph = {m: set(d) for m, d in import_graph().items()}
  src, dst = plant
  graph[src].add(dst)
  found = violations(graph, sizes())
  assert any(expect in v for v in found), found


def test_an_oversized_module_or_entry_point_is_reported():
  planted = {**sizes(), "latadj_jax/tuning/offline.py": 451, "eval.py": 80,
             "latadj_jax/models/bert.py": 351}
  found = violations(import_graph(), planted)
  assert any("offline.py has 451" in v for v in found) and any("eval.py has 80" in v for v in found)
  assert any("bert.py has 351 lines (limit 350)" in v for v in found)
