"""The house's floors hold (issue 26): the library never imports a program, and the
library's module-level imports have no circle. Read from the source with `ast`; nothing
is imported, so a circle shows here before it shows as a half-initialised module."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "qcs_jax")
# `python -m qcs_jax.train` is the card's command: a two-line shim over the program.
SHIMS = {"qcs_jax.train", "qcs_jax.__main__"}


def _modules() -> dict[str, str]:
  """Dotted name -> path of every module of the package."""
  out = {}
  for folder, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
  return out


def _target(name: str, modules: dict[str, str]) -> str | None:
  """The package module an imported name lives in (the longest dotted prefix that is one)."""
  parts = name.split(".")
  for k in range(len(parts), 0, -1):
    if ".".join(parts[:k]) in modules:
      return ".".join(parts[:k])
  return None


def imports(module: str, path: str, modules: dict[str, str],
            top_level_only: bool) -> set[str]:
  """The package modules that ``module`` imports (at module level only, if asked)."""
  tree = ast.parse(open(path).read(), path)
  # module level includes `try:` / `if:` blocks, not function or class bodies
  nodes = list(ast.walk(tree)) if not top_level_only else [
      n for top in tree.body for n in ast.walk(top)
      if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
  is_pkg = path.endswith("__init__.py")
  out = set()
  for n in nodes:
    names = []
    if isinstance(n, ast.Import):
      names = [a.name for a in n.names]
    elif isinstance(n, ast.ImportFrom):
      base = n.module or ""
      if n.level:
        anchor = module.split(".")[: len(module.split(".")) - n.level + (1 if is_pkg else 0)]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import sub` imports the submodule; `from pkg import name`, the package
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
               for a in n.names]
    for name in names:
      t = _target(name, modules)
      if t and t != module:
        out.add(t)
  return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
  modules = _modules()
  return {m: imports(m, p, modules, top_level_only) for m, p in modules.items()}


def test_the_library_never_imports_a_program():
  graph = _graph(top_level_only=False)
  assert len(graph) > 60 and "qcs_jax.cli.train" in graph  # the walk found the package
  upward = {m: sorted(t for t in ts if t.startswith("qcs_jax.cli"))
            for m, ts in graph.items()
            if not m.startswith("qcs_jax.cli") and m not in SHIMS}
  upward = {m: ts for m, ts in upward.items() if ts}
  assert not upward, upward


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if state.get(t) == 1:
        return stack[stack.index(t):] + [t]
      if t not in state and (found := visit(t)):
        return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_module_level_imports_have_no_circle():
  circle = _cycle(_graph(top_level_only=True))
  assert circle is None, " -> ".join(circle)


@pytest.mark.parametrize("graph, circle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
])
def test_the_circle_finder_finds_circles(graph, circle):
  assert _cycle(graph) == circle
