"""The process layer sits on top, and the package has no import cycle.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a chargepath module, at module level or inside a function, under
``TYPE_CHECKING`` or not, is an edge of the layering checks. The layers: ``chargepath.cli`` ->
``chargepath.supervisor`` -> ``chargepath.app`` -> (engine, store, transport, telemetry, core ...).
A function-local import cannot hide a cycle from this test. An import under ``TYPE_CHECKING``
never runs, so it is not an edge of the cycle check: a contract may name the value type of its
implementation for the type checker (``store.base`` names ``store.ledger.LedgerEntry``) without
the modules importing each other when the program runs."""

from __future__ import annotations

import ast
from pathlib import Path

import chargepath

PACKAGE = Path(chargepath.__file__).resolve().parent
PROCESS_LAYER = ("chargepath.cli", "chargepath.supervisor", "chargepath.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def imports_of(
    source: str, module: str, is_package: bool, modules: set[str], *, typing: bool = True
) -> set[str]:
    """The modules of ``modules`` that ``source`` (the text of ``module``) imports, relative
    imports made absolute. ``from a import b`` is an edge to ``a.b`` when that is a module, else
    to ``a`` (the longest prefix that is one). As for ``import a.b``, the implicit import of a
    parent package is not an edge: Python runs it before the module, whatever the order."""
    names: set[str] = set()
    tree = ast.parse(source)
    skip = set() if typing else _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    edges: set[str] = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            edges.add(name)
    return edges


def import_graph(*, typing: bool = True) -> dict[str, set[str]]:
    """Module -> the chargepath modules it imports (itself excluded); without ``typing``, the
    imports under ``TYPE_CHECKING`` are left out (those that run)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        module: imports_of(
            path.read_text(encoding="utf-8"),
            module,
            path.name == "__init__.py",
            set(paths),
            typing=typing,
        )
        for module, path in paths.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def in_process_layer(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in PROCESS_LAYER)


def test_the_reader_sees_local_relative_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from chargepath.engine import Engine\n"
        "from . import render\n"
        "def run():\n"
        "    from chargepath import supervisor\n"
        "    import chargepath.store.ledger\n"
    )
    modules = {
        "chargepath",
        "chargepath.cli",
        "chargepath.cli.render",
        "chargepath.cli.serve",
        "chargepath.engine",
        "chargepath.store",
        "chargepath.store.ledger",
        "chargepath.supervisor",
    }
    assert imports_of(source, "chargepath.cli.serve", False, modules) == {
        "chargepath.engine",
        "chargepath.cli.render",
        "chargepath.supervisor",
        "chargepath.store.ledger",
    }
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layers_are_as_designed() -> None:
    graph = import_graph()
    assert "chargepath.supervisor" in graph["chargepath.cli.serve"]
    assert "chargepath.app" in graph["chargepath.supervisor"]
    assert {"chargepath.engine", "chargepath.jobs", "chargepath.store.redis_store"} <= graph[
        "chargepath.app"
    ]


def test_nothing_below_the_process_layer_imports_it() -> None:
    graph = import_graph()
    upward = {
        (module, target)
        for module, targets in graph.items()
        if not in_process_layer(module)
        for target in targets
        if in_process_layer(target)
    }
    assert upward == set()


def test_the_supervisor_does_not_import_the_cli() -> None:
    graph = import_graph()
    assert not {t for t in graph["chargepath.supervisor"] if t.startswith("chargepath.cli")}


def test_no_import_cycle() -> None:
    assert cycles(import_graph(typing=False)) == []


def test_type_checking_imports_are_not_cycle_edges_but_still_layer_edges() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from chargepath.engine import Engine\n"
        "import chargepath.store\n"
    )
    modules = {"chargepath", "chargepath.engine", "chargepath.store"}
    assert imports_of(source, "chargepath.app", False, modules) == {
        "chargepath.engine",
        "chargepath.store",
    }
    assert imports_of(source, "chargepath.app", False, modules, typing=False) == {
        "chargepath.store"
    }
