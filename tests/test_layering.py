"""The package's layers hold: no module imports a higher layer, and no
modules import each other in a cycle.

Every module of ``ultramem_jax/``, ``pallas_kernels/`` and ``benchmarks/``
and the two command lines are parsed (``ast``, nothing is imported); every import
counts, at module level, inside functions and under ``if TYPE_CHECKING``.
Importing ``a.b.c`` also runs the ``__init__`` of the packages ``a`` and
``a.b``, so those are edges too, except to the importer's own packages
(which are already being imported when it runs): that is how an ``__init__``
that re-exports its modules can close a cycle through a sibling package.

Layers, lowest first (``*``: the package and everything in it). A new
module must be placed in one, or this test fails.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("ultramem_jax", "ultramem_jax.config", "ultramem_jax.memory_geometry"),
    ("ultramem_jax.data.*", "ultramem_jax.parallel.*", "ultramem_jax.tasks.*",
     "pallas_kernels.*"),
    ("ultramem_jax.model.*", "ultramem_jax.decode_cost"),
    ("ultramem_jax.training.*",),
    ("ultramem_jax.evaluation.*", "ultramem_jax.inspect", "ultramem_jax.sweep.*",
     "ultramem_jax.reproduction.*"),
    ("train", "eval"),
    ("benchmarks.*",),
)


def layer_of(module: str, layers=LAYERS) -> int | None:
  """The layer naming `module` itself or a package above it; None if none."""
  for i, names in enumerate(layers):
    for name in names:
      if name.endswith(".*"):
        pkg = name[:-2]
        if module == pkg or module.startswith(pkg + "."):
          return i
      elif module == name:
        return i
  return None


def _ancestors(module: str) -> list[str]:
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(sources: dict[str, str], packages: set[str]
                 ) -> dict[str, dict[str, int]]:
  """module -> {imported project module: line of the first such import}.
  `sources` maps every module name to its source text; `packages` are the
  names whose source is a package's ``__init__``."""
  edges: dict[str, dict[str, int]] = {}
  for module, text in sources.items():
    out = edges.setdefault(module, {})
    own = set(_ancestors(module)) | {module}

    def add(target: str, line: int, implicit: bool) -> None:
      if target not in sources or (implicit and target in own):
        return
      out.setdefault(target, line)

    def add_with_parents(target: str, line: int) -> None:
      for parent in _ancestors(target):
        add(parent, line, implicit=True)
      add(target, line, implicit=False)

    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.Import):
        for alias in node.names:
          add_with_parents(alias.name, node.lineno)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          pkg = module if module in packages else module.rpartition(".")[0]
          for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
          base = f"{pkg}.{base}" if base else pkg
        for parent in _ancestors(base) + [base]:
          add(parent, node.lineno, implicit=True)
        for alias in node.names:
          sub = f"{base}.{alias.name}"
          if sub in sources:
            add(sub, node.lineno, implicit=False)
          else:   # a name defined in `base` itself: it must be fully run
            add(base, node.lineno, implicit=False)
  return edges


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
  """One cycle (a, b, ..., a) per strongly connected group of modules."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  groups: list[list[str]] = []

  def visit(v: str) -> None:   # Tarjan; the graph is small enough to recurse
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, {}):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1 or v in edges.get(v, {}):
        groups.append(group)

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return [_cycle_in(sorted(g), edges) for g in groups]


def _cycle_in(group: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
  """A shortest cycle through the first module of a strongly connected group
  (breadth-first within the group)."""
  start, members = group[0], set(group)
  paths = {start: [start]}
  frontier = [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(edges.get(v, {})):
        if w == start:
          return paths[v] + [start]
        if w in members and w not in paths:
          paths[w] = paths[v] + [w]
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"no cycle through {start}")


def problems(sources: dict[str, str], packages: set[str], layers=LAYERS
             ) -> list[str]:
  """Every violation, as a sentence naming the modules."""
  out = []
  for module in sorted(sources):
    if layer_of(module, layers) is None:
      out.append(f"{module}: in no layer; add it to LAYERS in "
                 "tests/test_layering.py")
  edges = import_edges(sources, packages)
  for module in sorted(edges):
    here = layer_of(module, layers)
    for target, line in sorted(edges[module].items()):
      there = layer_of(target, layers)
      if here is not None and there is not None and there > here:
        out.append(f"{module} (layer {here}) imports {target} (layer "
                   f"{there}, a higher layer) at line {line}")
  for cycle in find_cycles(edges):
    out.append("import cycle: " + " -> ".join(cycle))
  return out


def project_sources() -> tuple[dict[str, str], set[str]]:
  files = [REPO / "train.py", REPO / "eval.py"]
  for pkg in ("ultramem_jax", "pallas_kernels", "benchmarks"):
    files += sorted((REPO / pkg).rglob("*.py"))
  sources, packages = {}, set()
  for path in files:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
      packages.add(".".join(parts))
    sources[".".join(parts)] = path.read_text()
  return sources, packages


def test_no_upward_import_no_cycle_and_every_module_placed():
  sources, packages = project_sources()
  assert "ultramem_jax.training.trainer" in sources and "train" in sources
  assert "benchmarks.run" in sources and "benchmarks.decode" in sources
  found = problems(sources, packages)
  assert not found, "\n".join(found)


# ------------------------------------------------- the checker itself fails


def _synthetic(**modules: str) -> tuple[dict[str, str], set[str]]:
  """Modules named with '__' for '.'; a trailing '__init' marks a package."""
  sources, packages = {}, set()
  for key, text in modules.items():
    name = key.replace("__", ".")
    if name.endswith(".init"):
      name = name[:-len(".init")]
      packages.add(name)
    sources[name] = text
  return sources, packages


LOW_HIGH = (("low.*",), ("high.*",))


def test_checker_reports_a_cycle_by_name():
  sources, packages = _synthetic(
      low__init="", low__a="import low.b\n",
      low__b="def f():\n  from low import a\n")
  assert problems(sources, packages, LOW_HIGH) == [
      "import cycle: low.a -> low.b -> low.a"]


def test_checker_reports_an_upward_import_naming_both_modules():
  sources, packages = _synthetic(
      low__init="", high__init="", high__x="",
      low__a="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
             "  from high.x import thing\n")
  assert problems(sources, packages, LOW_HIGH) == [
      "low.a (layer 0) imports high (layer 1, a higher layer) at line 3",
      "low.a (layer 0) imports high.x (layer 1, a higher layer) at line 3"]
  # high.x importing low.a is downward, so allowed, but closes a cycle.
  sources["high.x"] = "import low.a\n"
  found = problems(sources, packages, LOW_HIGH)
  assert found == [
      "low.a (layer 0) imports high (layer 1, a higher layer) at line 3",
      "low.a (layer 0) imports high.x (layer 1, a higher layer) at line 3",
      "import cycle: high.x -> low.a -> high.x"]


def test_checker_reports_a_module_in_no_layer():
  sources, packages = _synthetic(low__init="", newpkg__init="", newpkg__m="")
  assert problems(sources, packages, LOW_HIGH) == [
      "newpkg: in no layer; add it to LAYERS in tests/test_layering.py",
      "newpkg.m: in no layer; add it to LAYERS in tests/test_layering.py"]


def test_checker_sees_a_cycle_closed_by_a_package_init():
  """m.config needs m.mem.config, whose package __init__ imports the layer,
  which needs m.config: importing m.config first fails at run time."""
  sources, packages = _synthetic(
      m__init="", m__config="from m.mem.config import MemoryConfig\n",
      m__mem__init="from m.mem.layer import Layer\n", m__mem__config="",
      m__mem__layer="from m.config import ModelConfig\n")
  assert problems(sources, packages, (("m.*",),)) == [
      "import cycle: m.config -> m.mem -> m.mem.layer -> m.config"]
  # The same package re-exporting its modules, which import each other as
  # `from package import module`, is no cycle (the __init__ runs first).
  sources, packages = _synthetic(
      t__init="from t.a import A\nfrom t.b import B\n",
      t__a="from t import b\n", t__b="from . import base\n", t__base="")
  assert problems(sources, packages, (("t.*",),)) == []


@pytest.mark.parametrize("text", ["from ..x import y\n", "from .. import x\n"])
def test_checker_resolves_relative_imports(text):
  sources, packages = _synthetic(low__init="", low__x="", low__sub__init="",
                                 low__sub__m=text)
  assert "low.x" in import_edges(sources, packages)["low.sub.m"]
