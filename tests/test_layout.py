"""The package's shape: no import cycles, the library never imports the runner or experiments,
and no public name hides a subpackage."""
import ast
import os
import pkgutil

import qjax

ROOT = os.path.dirname(qjax.__file__)
RUNNER = ("qjax.main", "qjax.__main__")


def _modules() -> dict[str, str]:
  """Every module of the qjax package: dotted name -> file."""
  out = {"qjax": os.path.join(ROOT, "__init__.py")}
  for info in pkgutil.walk_packages([ROOT], prefix="qjax."):
    path = os.path.join(ROOT, *info.name.split(".")[1:])
    out[info.name] = os.path.join(path, "__init__.py") if info.ispkg else path + ".py"
  return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """qjax modules imported anywhere in the file (function-level imports included)."""
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  found = set()
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_library_never_imports_the_runner_or_experiments():
  for name, deps in _graph().items():
    if name in RUNNER or name.startswith("qjax.experiments"):
      continue
    bad = {d for d in deps if d in RUNNER or d.startswith("qjax.experiments")}
    assert not bad, f"library module {name} imports {sorted(bad)}"


def test_experiments_never_import_the_runner():
  for name, deps in _graph().items():
    if name.startswith("qjax.experiments"):
      assert not deps & set(RUNNER), f"{name} imports the runner"


def test_no_import_cycles():
  graph = _graph()
  state: dict[str, int] = {}

  def visit(node, stack):
    state[node] = 1
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        cycle = stack[stack.index(dep):] + [dep]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_no_public_name_hides_a_subpackage():
  subpackages = {n.split(".")[1] for n in _modules() if n.count(".") >= 1}
  for public in qjax.__all__:
    value = getattr(qjax, public)
    if public in subpackages:
      assert getattr(value, "__name__", None) == f"qjax.{public}", (
          f"qjax.{public} is {value!r}, which hides the subpackage qjax.{public}")
