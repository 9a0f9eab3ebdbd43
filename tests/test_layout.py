"""The package's shape: no import cycles, the library never imports the runner or experiments,
no public name hides a subpackage, `qjax.__all__` is the package's public API, and experiments
and benchmarks reach qjax through public names only."""
import ast
import glob
import os
import pkgutil
import re
import types

import qjax

ROOT = os.path.dirname(qjax.__file__)
BENCHMARKS = os.path.join(os.path.dirname(ROOT), "benchmarks")
RUNNER = ("qjax.main", "qjax.__main__")
# The methods' private modules: their public names are re-exported by `qjax`.
PRIVATE_METHODS = ("qjax._gpfq", "qjax._gptq", "qjax._qronos")
# Who may import them, and why (a module of a private package may import its own package).
PRIVATE_METHOD_IMPORTERS = {
    "qjax": "re-exports gpfq, quantize_msq, gpfq_layer, gpfq_flops, gptq, gptq_layer, qronos, "
            "qronos_layer",
    "qjax._qronos": "builds on GPFQ's kernels and layer checks and on GPTQ's column loop",
}


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


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_all_lists_every_public_name_and_only_existing_ones():
  assert len(set(qjax.__all__)) == len(qjax.__all__), "qjax.__all__ has duplicates"
  missing = [n for n in qjax.__all__ if not hasattr(qjax, n)]
  assert not missing, f"qjax.__all__ names attributes that do not exist: {missing}"
  public = {n for n in dir(qjax) if not n.startswith("_")
            and not isinstance(getattr(qjax, n), types.ModuleType)}
  assert not public - set(qjax.__all__), (
      f"public attributes of qjax missing from __all__: {sorted(public - set(qjax.__all__))}")
  # Every name qjax/__init__.py imports on purpose (modules included) is public API.
  with open(os.path.join(ROOT, "__init__.py")) as f:
    tree = ast.parse(f.read())
  bound = {(a.asname or a.name).split(".")[0] for node in tree.body
           if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
  bound = {n for n in bound if not n.startswith("_") and n != "qjax"}
  assert not bound - set(qjax.__all__), (
      f"qjax/__init__.py imports {sorted(bound - set(qjax.__all__))} but __all__ lacks them")


def test_package_docstring_names_every_public_name():
  doc = qjax.__doc__ or ""
  absent = [n for n in qjax.__all__ if not re.search(rf"\b{re.escape(n)}\b", doc)]
  assert not absent, f"qjax's docstring does not name {absent}"


def private_uses(source: str, package: str, modules: dict[str, str]) -> list[str]:
  """Private names of qjax modules that `source` (a module of `package`) reaches: `from M import
  _x`, `M._x` or `M.sub._x` with M an imported qjax module (private modules included)."""
  tree = ast.parse(source)
  aliases: dict[str, str] = {}  # local name -> qjax module it is bound to
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] != "qjax":
          continue
        found += [a.name for p in a.name.split(".") if _is_private(p)][:1]
        aliases[a.asname or "qjax"] = a.name if a.asname else "qjax"
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      if base.split(".")[0] != "qjax":
        continue
      for a in node.names:
        if any(_is_private(p) for p in base.split(".")) or _is_private(a.name):
          found.append(f"from {base} import {a.name}")
        if f"{base}.{a.name}" in modules:
          aliases[a.asname or a.name] = f"{base}.{a.name}"
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    chain, value = [node.attr], node.value
    while isinstance(value, ast.Attribute):
      chain.append(value.attr)
      value = value.value
    if not isinstance(value, ast.Name) or value.id not in aliases:
      continue
    module = aliases[value.id]
    for attr in reversed(chain):  # walk down while the prefix is a qjax module
      if _is_private(attr):
        found.append(ast.unparse(node))
        break
      module = f"{module}.{attr}"
      if module not in modules:
        break
  return sorted(set(found))


def test_private_uses_finds_them():
  modules = _modules()
  src = ("import qjax\nimport qjax._gpfq.kernels\nfrom qjax import driver\n"
         "from qjax.experiments import ptq as tf\nfrom qjax._gptq import gptq\n"
         "from qjax.driver import _relative_error\nfrom . import gpfq as g\n"
         "qjax.program._strip\ntf._plot(1)\ng._common\ndriver.Report._fields\n"
         "qjax.__version__\nother._x\nqjax.grids.GridSpec._replace\n")
  assert private_uses(src, "qjax.experiments", modules) == sorted([
      "qjax._gpfq.kernels", "from qjax._gptq import gptq", "from qjax.driver import _relative_error",
      "qjax.program._strip", "tf._plot", "g._common"])
  assert not private_uses("import qjax\nfrom qjax import gpfq_flops, grids\nx._y\n"
                          "grids.GridSpec._fields\n", "qjax.experiments", modules)


def _experiment_and_benchmark_files() -> dict[str, tuple[str, str]]:
  """file -> (its module name, its package) for qjax/experiments and the benchmark scripts."""
  out = {path: (name, name if path.endswith("__init__.py") else name.rsplit(".", 1)[0])
         for name, path in _modules().items() if name.startswith("qjax.experiments")}
  for path in sorted(glob.glob(os.path.join(BENCHMARKS, "*.py"))):
    name = "benchmarks." + os.path.basename(path)[:-3]
    out[path] = (name, "benchmarks")
  return out


def test_experiments_and_benchmarks_use_public_names_only():
  modules = _modules()
  files = _experiment_and_benchmark_files()
  assert any(n.startswith("benchmarks.") for n, _ in files.values()), "no benchmark scripts found"
  for path, (_, package) in files.items():
    with open(path) as f:
      uses = private_uses(f.read(), package, modules)
    assert not uses, f"{os.path.relpath(path, os.path.dirname(ROOT))} uses private names {uses}"


def _private_package(module: str) -> str | None:
  return next((p for p in PRIVATE_METHODS if module == p or module.startswith(p + ".")), None)


def test_private_method_modules_are_imported_by_the_core_only():
  modules = _modules()
  private = {m for m in modules if _private_package(m)}
  assert {"qjax._gpfq.network", "qjax._gpfq.rounders", "qjax._gptq", "qjax._qronos"} <= private
  assert "qjax.rtn" in modules and "qjax.rtn" not in private  # RTN is public: qjax.rtn
  importers = _graph()
  for path, (name, _) in _experiment_and_benchmark_files().items():
    if name.startswith("benchmarks."):
      importers[name] = _imports(name, path, modules)
  for name, deps in importers.items():
    if name in PRIVATE_METHOD_IMPORTERS:
      continue
    bad = sorted(d for d in deps & private if _private_package(d) != _private_package(name))
    assert not bad, (f"{name} imports {bad}; use the public names (qjax.gpfq, ...) or add it to "
                     "PRIVATE_METHOD_IMPORTERS with the reason")
