"""The gallery package's modules import one way (gallery/__init__.py lists them by concern): the
face (api.py) calls down into the steps of a search and into the update's driver, and nothing
calls back up into it, so a query passes through each module once."""

from __future__ import annotations

import ast
from pathlib import Path

import leanclip.gallery

GALLERY = Path(leanclip.gallery.__file__).parent
SEARCH = {"query", "filters", "vectors", "hits", "reader"}
UPDATE = {"sync", "run", "scan", "reconcile", "encoding", "upkeep"}


def _gallery_imports() -> dict:
    """Module name -> the names of the gallery modules it imports."""
    graph = {}
    for path in GALLERY.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "leanclip.gallery":
                found.update(a.name for a in node.names)  # from leanclip.gallery import store
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("leanclip.gallery."):
                found.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                found.update(
                    a.name.split(".")[2] for a in node.names if a.name.startswith("leanclip.gallery.")
                )
        graph[path.stem] = found & {p.stem for p in GALLERY.glob("*.py")}
    return graph


def test_the_graph_is_read() -> None:
    graph = _gallery_imports()
    assert SEARCH | UPDATE | {"api", "store", "__init__"} <= set(graph)
    assert {"query", "filters", "vectors", "hits", "reader", "sync"} <= graph["api"]
    assert {"run", "scan", "reconcile", "encoding", "upkeep"} <= graph["sync"]


def test_nothing_imports_the_face_or_the_driver_from_below() -> None:
    graph = _gallery_imports()
    assert [m for m, deps in graph.items() if "api" in deps and m != "__init__"] == []
    assert sorted(m for m, deps in graph.items() if "sync" in deps) == ["api"]


def test_search_and_update_keep_apart_and_there_is_no_circle() -> None:
    graph = _gallery_imports()
    assert {m: graph[m] & UPDATE for m in SEARCH if graph[m] & UPDATE} == {}
    assert {m: graph[m] & SEARCH for m in UPDATE if graph[m] & SEARCH} == {}
    done: set = set()

    def visit(module: str, path: tuple) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for dep in graph[module]:
                visit(dep, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())
