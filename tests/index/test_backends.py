"""The backend table (``index.store.BACKENDS``): names resolve lazily to their modules, unknown names and
missing extras fail clearly, the Milvus path never imports faiss, and the modules of ``index/`` import
one another without a cycle."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from index.gallery import Gallery
from index.store import (
    BACKENDS,
    BackendUnavailableError,
    UnknownBackendError,
    open_store,
    store_class,
)
from tests.index.conftest import BACKEND_CASES, DIM, MODEL_HASH, TASKS, VARIANTS, needs_milvus_lite

REPO = Path(__file__).resolve().parents[2]
INDEX = REPO / "index"
MODULES = {
    ("index" if path.stem == "__init__" else f"index.{path.stem}"): path
    for path in sorted(INDEX.glob("*.py"))
}


def run_python(code: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (nothing imported yet), from the repository root."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the table -------------------------------------------------------------------------------------


def test_cases_cover_exactly_the_table() -> None:
    assert set(VARIANTS) <= set(BACKENDS)
    for name, cases in VARIANTS.items():
        assert cases and all(case.backend == name for case in cases)
    assert {case.backend for case in BACKEND_CASES} == set(BACKENDS)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_name_resolves_to_its_modules_store(name: str) -> None:
    cls = store_class(name)
    assert cls.__module__ == BACKENDS[name]
    assert cls.backend == name  # what the store writes into its manifests


def test_unknown_backend_names_the_known_ones(tmp_path: Path) -> None:
    expected = f"unknown backend 'nope'; choose one of: {', '.join(sorted(BACKENDS))}"
    with pytest.raises(UnknownBackendError) as raised:
        store_class("nope")
    assert str(raised.value) == expected
    assert isinstance(raised.value, ValueError)  # what open_store raised before the table
    with pytest.raises(UnknownBackendError, match="choose one of: faiss, milvus"):
        open_store("nope", tmp_path / "store", tasks=TASKS, dim=DIM, model_hash=MODEL_HASH)
    with pytest.raises(UnknownBackendError):
        Gallery.create(tmp_path / "gallery", tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, backend="nope")
    assert not (tmp_path / "gallery").exists()  # nothing recorded for a gallery that cannot open


def test_missing_pymilvus_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed: importing it fails
    with pytest.raises(BackendUnavailableError, match=r"needs pymilvus.*pip install modret\[milvus\]"):
        open_store("milvus", tmp_path, tasks=TASKS, dim=DIM, model_hash=MODEL_HASH)
    with pytest.raises(ImportError):  # BackendUnavailableError is an ImportError
        open_store("milvus", tmp_path, tasks=TASKS, dim=DIM, model_hash=MODEL_HASH)


@needs_milvus_lite
def test_missing_milvus_lite_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "milvus_lite", None)  # find_spec answers None, as when not installed
    with pytest.raises(BackendUnavailableError, match=r"needs milvus-lite.*pip install modret\[milvus\]"):
        open_store("milvus", tmp_path, tasks=TASKS, dim=DIM, model_hash=MODEL_HASH)


# --- what gets imported ----------------------------------------------------------------------------


def test_the_contract_imports_no_backend() -> None:
    """``index.store`` alone loads no backend module; the Milvus module alone loads neither faiss nor
    pymilvus (pymilvus comes with the first store opened)."""
    result = run_python(
        """
        import sys
        import index.store
        assert not set(index.store.BACKENDS.values()) & set(sys.modules), sorted(sys.modules)
        import index.milvus_store
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("faiss", "pymilvus", "torch"))
        assert not loaded, loaded
        assert "index.faiss_store" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


SERVER = """
import sys
from milvus_lite.adapter.grpc.server import start_server_in_thread

server, db, port = start_server_in_thread(sys.argv[1])
print(port, flush=True)
sys.stdin.read()  # serve until the test closes stdin
server.stop(0)
db.close()
"""

CLIENT = """
import sys
from pathlib import Path

import numpy as np

from index.gallery import Gallery
from index.store import open_store

uri, root = sys.argv[1], Path(sys.argv[2])
tasks, model_hash = ["Smiling", "Eyeglasses"], "0" * 64
gallery = Gallery.create(
    root / "gallery", tasks=tasks, dim=8, model_hash=model_hash, backend="milvus", store_options={"uri": uri}
)
gallery.save()
gallery.close()
gallery = Gallery.open(root / "gallery", model_hash=model_hash)
report = gallery.verify(model_hash)
assert report.ok, report.problems
gallery.close()

options = {"uri": uri, "collection_prefix": "direct"}
store = open_store("milvus", root / "store", tasks=tasks, dim=8, model_hash=model_hash, options=options)
vectors = np.eye(8, dtype=np.float32)[:3]
store.add(np.arange(3, dtype=np.int64), {task: vectors for task in tasks})
store.save()
store.close()
store = open_store("milvus", root / "store", tasks=tasks, dim=8, model_hash=model_hash, options=options)
assert store.search("Eyeglasses", vectors, 1).ids[:, 0].tolist() == [0, 1, 2]
store.close()

heavy = ("faiss", "milvus_lite")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy or m == "index.faiss_store")
assert not loaded, loaded
print("ok")
"""


@needs_milvus_lite
def test_a_milvus_gallery_never_imports_faiss(tmp_path: Path) -> None:
    """Creating and opening a Milvus-backed gallery and store imports no faiss.

    Milvus Lite 3 is pure Python and itself imports faiss into the process that serves a ``.db`` file, so
    the Lite server runs in a process of its own (over ``tmp_path``) and the process under test reaches it
    by address, as a deployment reaches a Milvus cluster."""
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path / "milvus.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        assert port.isdigit(), (tmp_path / "server.log").read_text()
        result = run_python(CLIENT, f"http://127.0.0.1:{port}", str(tmp_path))
        assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# --- no import cycle -------------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The dotted names one import statement of ``module`` loads (``from p import n``: ``p`` and ``p.n``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    package = module if MODULES.get(module, Path()).stem == "__init__" else module.rpartition(".")[0]
    if node.level:
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def imports_of(module: str) -> set[str]:
    """Modules of ``index/`` that ``module`` imports anywhere: at module level or inside a function (a
    lazy import closes a circle as surely, only later), not under ``if TYPE_CHECKING``. The table's
    ``importlib`` lookups are no import statements: they are the one way from contract to backend."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if not _is_type_checking(node.test):
                self.generic_visit(node)
            else:
                for child in node.orelse:
                    self.visit(child)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(_imported(node, module))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            found.update(_imported(node, module))

    Visitor().visit(ast.parse(MODULES[module].read_text()))
    return {name for name in found if name in MODULES and name != module}


def test_index_modules_import_without_a_cycle() -> None:
    graph = {module: imports_of(module) for module in MODULES}
    assert "index.store" in graph["index.faiss_store"]  # parsed as meant
    assert "index.gpu_search" in graph["index.faiss_store"]  # a function-level import counts
    assert "index.generations" not in graph["index.store"]  # an ``if TYPE_CHECKING`` one does not
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle in index/: {' -> '.join(e.args[1])}")


def test_the_table_is_the_only_place_naming_the_backends() -> None:
    """``index.store`` imports no backend module, not even inside a function: ``BACKENDS`` names them."""
    tree = ast.parse(MODULES["index.store"].read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imported |= _imported(node, "index.store")
    assert not imported & set(BACKENDS.values())
