"""The architecture's rules (docs/architecture.md), read from the source with ``ast``:

(a) a lower layer never imports a higher one: ``model`` <- ``index`` <- ``service``;
(b) ``service/runtime/`` never imports FastAPI (nor Starlette, ``service.api``, ``service.cli``), and
    ``service/api/`` never imports ``service.cli``;
(c) the project's module import graph has no cycle;
(d) no source file is over ``MAX_LINES`` lines (``LONG_FILES`` excepted).

Every ``import`` counts, at module level or inside a function, except those under ``if TYPE_CHECKING:``
(never run). ``from pkg import name`` is an edge to the module ``pkg.name`` where that is a module, else to
``pkg``; importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` too, but those implicit imports are
not edges: a package ``__init__`` that imports its own submodules is the usual layout, and is a cycle only
where a submodule explicitly imports a name from that ``__init__``. A failure lists each offending import
as ``path:line: importer -> imported``. The checker itself is tested on a synthetic tree below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "index", "service")  # lowest first
MAX_LINES = 600
LONG_FILES = {"model/network.py"}
# (importing package, what it must not import, why)
BOUNDARIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "service.runtime",
        ("fastapi", "starlette", "service.api", "service.cli"),
        "the runtime knows nothing of HTTP or the CLI",
    ),
    ("service.api", ("service.cli",), "the HTTP edge never imports the CLI"),
)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # a project module where it names one, else the dotted name as written
    path: str  # the importer's file, relative to the root
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} -> {self.imported}"


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_modules(root: Path, packages: Sequence[str] = LAYERS) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the packages (``__init__`` = the package)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: Iterable[str]) -> None:
        self.module, self.known = module, set(known)
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):  # never runs: visit only the else branch
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.extend((node.lineno, alias.name) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            full = ".".join([*base, *([node.module] if node.module else [])])
        else:
            full = node.module or ""
        for alias in node.names:
            submodule = f"{full}.{alias.name}"
            self.found.append((node.lineno, submodule if submodule in self.known else full))


def collect_imports(root: Path, packages: Sequence[str] = LAYERS) -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(root, packages)
    imports: list[Import] = []
    for name, path in modules.items():
        visitor = _ImportVisitor(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        rel = path.relative_to(root).as_posix()
        imports.extend(Import(name, imported, rel, line) for line, imported in visitor.found)
    return modules, imports


def layer_violations(imports: Iterable[Import], layers: Sequence[str] = LAYERS) -> list[str]:
    rank = {name: i for i, name in enumerate(layers)}
    bad = []
    for imp in imports:
        source, target = imp.importer.split(".")[0], imp.imported.split(".")[0]
        if source in rank and target in rank and rank[target] > rank[source]:
            bad.append(f"{imp}  ({source} is below {target})")
    return bad


def boundary_violations(imports: Iterable[Import], boundaries=BOUNDARIES) -> list[str]:
    bad = []
    for imp in imports:
        for package, forbidden, why in boundaries:
            if under(imp.importer, package) and any(under(imp.imported, f) for f in forbidden):
                bad.append(f"{imp}  ({why})")
    return bad


def import_cycles(modules: Iterable[str], imports: Iterable[Import]) -> list[list[Import]]:
    """One cycle (as its edges) per strongly connected group of project modules that import each other."""
    nodes = set(modules)
    edges: dict[str, dict[str, Import]] = {node: {} for node in nodes}
    for imp in imports:
        if imp.imported in nodes and imp.imported != imp.importer:
            edges[imp.importer].setdefault(imp.imported, imp)

    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    cycles = []
    for group in groups:  # a shortest way from the group's first module back to itself, inside the group
        first = min(group)
        paths: dict[str, list[Import]] = {first: []}
        frontier = [first]
        cycle: list[Import] | None = None
        while frontier and cycle is None:
            nxt = []
            for node in frontier:
                for child, imp in sorted(edges[node].items()):
                    if child == first:
                        cycle = [*paths[node], imp]
                        break
                    if child in group and child not in paths:
                        paths[child] = [*paths[node], imp]
                        nxt.append(child)
                if cycle is not None:
                    break
            frontier = nxt
        assert cycle is not None
        cycles.append(cycle)
    return sorted(cycles, key=lambda c: c[0].importer)


def long_files(
    root: Path, packages: Sequence[str] = LAYERS, allowed: Iterable[str] = LONG_FILES
) -> list[str]:
    allowed = set(allowed)
    bad = []
    for path in find_modules(root, packages).values():
        rel = path.relative_to(root).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES and rel not in allowed:
            bad.append(f"{rel}: {lines} lines (at most {MAX_LINES})")
    return bad


def _report(title: str, problems: Sequence[str]) -> str:
    return f"{title}:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------------
# The rules, on the project's source


MODULES, IMPORTS = collect_imports(ROOT)


def test_the_checker_sees_the_source() -> None:
    # A walker that found nothing would pass every rule: check it sees imports that are known to exist.
    assert {"model.network", "index.gallery", "service.api.app", "service.runtime.search"} <= set(MODULES)
    seen = {(imp.importer, imp.imported) for imp in IMPORTS}
    assert any(a.startswith("index.") and b.startswith("model.") for a, b in seen)
    assert any(a.startswith("service.") and b.startswith("index.") for a, b in seen)
    assert any(under(a, "service.api") and under(b, "fastapi") for a, b in seen)
    assert ("service.cli", "service.cli.train") in seen  # `from service.cli import train`: the module


def test_no_layer_imports_a_higher_one() -> None:
    problems = layer_violations(IMPORTS)
    assert not problems, _report("imports from a higher layer (model <- index <- service)", problems)


def test_runtime_and_api_keep_to_their_side() -> None:
    problems = boundary_violations(IMPORTS)
    assert not problems, _report("imports across a service boundary", problems)


def test_the_import_graph_has_no_cycle() -> None:
    cycles = import_cycles(MODULES, IMPORTS)
    assert not cycles, _report("import cycles", [" ; ".join(str(edge) for edge in cycle) for cycle in cycles])


def test_no_source_file_is_too_long() -> None:
    problems = long_files(ROOT)
    assert not problems, _report(f"files over {MAX_LINES} lines (split them)", problems)


# --------------------------------------------------------------------------------------------------
# The checker, on a synthetic tree that breaks every rule


SYNTHETIC = {
    "model/__init__.py": "",
    "model/a.py": "import os\nfrom index.b import thing\n",  # (a): model -> index
    "model/network.py": "x = 1\n" * 700,  # long, but allowed
    "index/__init__.py": "",
    "index/b.py": (
        "from typing import TYPE_CHECKING\n"
        "from model import a\n"  # fine: downwards
        "if TYPE_CHECKING:\n"
        "    from service.c import C\n"  # never runs: not an import
        "else:\n"
        "    from service import x\n"  # (a): the else branch runs
        "def f():\n"
        "    from service import c\n"  # (a): inside a function still counts
        "    return c\n"
    ),
    "service/__init__.py": "",
    "service/c.py": "import model.a\n",
    "service/x.py": "import service.y\n",  # (c): x -> y -> x
    "service/y.py": "from service import x\n",
    "service/long.py": "y = 2\n" * 601,  # (d)
    "service/runtime/__init__.py": "",
    "service/runtime/r.py": (
        "from fastapi import FastAPI\n"  # (b)
        "from ..api import app\n"  # (b), relative: service.api.app
        "from . import s\n"  # fine: its own package's module
    ),
    "service/runtime/s.py": "import starlette.responses\n",  # (b)
    "service/api/__init__.py": "",
    "service/api/app.py": "from service.cli import main\n",  # (b): a name in service/cli/__init__.py
    "service/cli/__init__.py": "from service.cli import sub, other\nmain = 1\n",
    "service/cli/sub.py": "from service.cli.other import thing\n",  # fine: the parent is no edge
    "service/cli/other.py": "from service.cli import main\nthing = 1\n",  # (c): cli <-> cli.other
}


def _synthetic(tmp_path: Path) -> tuple[dict[str, Path], list[Import]]:
    for rel, text in SYNTHETIC.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return collect_imports(tmp_path)


def test_checker_finds_each_broken_rule_in_a_synthetic_tree(tmp_path: Path) -> None:
    modules, imports = _synthetic(tmp_path)
    edges = {(imp.importer, imp.imported) for imp in imports}
    assert ("service.runtime.r", "service.api.app") in edges  # relative import resolved to the module
    assert ("service.runtime.r", "service.runtime.s") in edges
    assert ("index.b", "model.a") in edges and ("service.api.app", "service.cli") in edges
    assert not [imp for imp in imports if imp.path == "index/b.py" and imp.line == 4]  # TYPE_CHECKING

    assert sorted(layer_violations(imports)) == [
        "index/b.py:6: index.b -> service.x  (index is below service)",
        "index/b.py:8: index.b -> service.c  (index is below service)",
        "model/a.py:2: model.a -> index.b  (model is below index)",
    ]

    boundaries = sorted(boundary_violations(imports))
    assert [b.split("  ")[0] for b in boundaries] == [
        "service/api/app.py:1: service.api.app -> service.cli",
        "service/runtime/r.py:1: service.runtime.r -> fastapi",
        "service/runtime/r.py:2: service.runtime.r -> service.api.app",
        "service/runtime/s.py:1: service.runtime.s -> starlette.responses",
    ], boundaries

    cycles = [[(e.importer, e.imported) for e in cycle] for cycle in import_cycles(modules, imports)]
    assert cycles == [
        [("index.b", "model.a"), ("model.a", "index.b")],  # the upward import closes a circle too
        [("service.cli", "service.cli.other"), ("service.cli.other", "service.cli")],
        [("service.x", "service.y"), ("service.y", "service.x")],
    ], cycles

    assert long_files(tmp_path) == ["service/long.py: 601 lines (at most 600)"]


def test_a_package_init_importing_its_submodules_is_no_cycle(tmp_path: Path) -> None:
    files = {
        "service/__init__.py": "",
        "service/cli/__init__.py": "from service.cli import a, b\n",
        "service/cli/a.py": "from service.cli.b import f\n",  # runs service/cli/__init__ first: no edge
        "service/cli/b.py": "def f():\n    from service.cli import a\n    return a\n",  # to the module a
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules, imports = collect_imports(tmp_path, ["service"])
    cycles = import_cycles(modules, imports)
    assert [[(e.importer, e.imported) for e in c] for c in cycles] == [
        [("service.cli.a", "service.cli.b"), ("service.cli.b", "service.cli.a")]
    ]  # a <-> b through the function-level import is a real cycle; the __init__ edges are not
    (tmp_path / "service/cli/b.py").write_text("def f():\n    return 1\n")
    modules, imports = collect_imports(tmp_path, ["service"])
    assert import_cycles(modules, imports) == []
