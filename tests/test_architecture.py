"""The code keeps the layers docs/architecture.md draws: no import circle, no import its layer table
does not allow (so none upward), every module in a layer, and no function over 60 lines. The table
is read from the page itself, so the page and the code cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "architecture.md"
MAX_LINES = 60


# ---- reading the code ---------------------------------------------------------------------------


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under root/runner (a package by its __init__)."""
    out = {}
    for path in sorted((root / "runner").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _runner_imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported dotted name, line) of every import of the project in a module, at any depth."""
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "runner"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "runner":  # `from runner.x import y`: y may be a module itself
                out += [(f"{name}.{a.name}", node.lineno) for a in node.names]
    return out


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: line}. Importing a.b.c runs the __init__ of a and a.b: those count
    as imported too when they import something of the project themselves."""
    known = modules(root)
    raw = {m: _runner_imports(ast.parse(p.read_text()), m, p.name == "__init__.py") for m, p in known.items()}
    heavy = {m for m, p in known.items() if p.name == "__init__.py" and raw[m]}
    graph: dict[str, dict[str, int]] = {}
    for m, imports in raw.items():
        deps: dict[str, int] = {}
        for name, line in imports:
            target = _resolve(name, known)
            if target is None:
                continue
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in heavy and not (m == parent or m.startswith(parent + ".")):  # not its own package's
                    deps.setdefault(parent, line)
            if target != m:
                deps.setdefault(target, line)
        graph[m] = deps
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    out = []
    for path in sorted((root / "runner").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return out


# ---- reading the page ---------------------------------------------------------------------------


def layer_table(page: Path = PAGE) -> list[tuple[str, list[str], list[str]]]:
    """(layer, module patterns, layers it may import), in the page's order (bottom first)."""
    text = page.read_text()
    block = text.split("<!-- layer table start -->")[1].split("<!-- layer table end -->")[0]
    rows = []
    for line in block.strip().splitlines()[2:]:
        name, patterns, may = (c.strip() for c in line.strip().strip("|").split("|"))
        rows.append((name, re.findall(r"`([^`]+)`", patterns), [] if may == "—" else [m.strip() for m in may.split(",")]))
    return rows


def layer_of(module: str, table: list[tuple[str, list[str], list[str]]]) -> str | None:
    """The layer whose pattern matching `module` is longest (`a.*`: a's submodules; `a`: a itself)."""
    best, best_len = None, -1
    for name, patterns, _ in table:
        for pat in patterns:
            hit = module.startswith(pat[:-1]) if pat.endswith(".*") else module == pat
            if hit and len(pat) > best_len:
                best, best_len = name, len(pat)
    return best


def violations(graph: dict[str, dict[str, int]], table: list[tuple[str, list[str], list[str]]], root: Path = REPO) -> list[str]:
    """Every import the table does not allow, every module in no layer."""
    allowed = {name: set(may) | {name} for name, _, may in table}
    out = []
    for m in sorted(graph):
        own = layer_of(m, table)
        if own is None:
            out.append(f"{m}: in no layer of the table")
            continue
        for dep, line in sorted(graph[m].items()):
            theirs = layer_of(dep, table)
            if theirs not in allowed[own]:
                path = modules(root)[m].relative_to(root)
                out.append(f"{path}:{line}: {m} ({own}) imports {dep} ({theirs}), which its layer may not import")
    return out


# ---- the checks -----------------------------------------------------------------------------------


def test_the_layer_table_only_looks_down_and_claims_every_module_once():
    table = layer_table()
    order = [name for name, _, _ in table]
    assert len(set(order)) == len(order), "a layer is named twice"
    for i, (name, _, may) in enumerate(table):
        for other in may:
            assert other in order, f"{name} may import {other!r}, which is no layer of the table"
            assert order.index(other) < i, f"{name} may import {other}, a layer drawn above it: the table must only look down"
    known = modules(REPO)
    for name, patterns, _ in table:
        for pat in patterns:
            assert any(layer_of(m, [(name, [pat], [])]) for m in known), f"{pat} ({name}) matches no module"
    assert [m for m in known if layer_of(m, table) is None] == []


def test_runner_has_no_import_circle():
    assert cycles(import_graph(REPO)) == []


def test_no_module_imports_what_its_layer_may_not():
    assert violations(import_graph(REPO), layer_table()) == []


def test_no_function_in_runner_is_longer_than_a_screen():
    assert long_functions(REPO) == []


def test_the_worker_launcher_and_the_executors_load_no_training_code():
    """What an executor imports to start a worker loads neither the worker's internals nor the CLI:
    checked in a fresh interpreter, where nothing else has been imported."""
    import subprocess
    import sys

    code = ("import sys; import runner.executors.registry, runner.executors.local, runner.executors.docker, "
            "runner.executors.ray; bad = sorted(m for m in sys.modules if m in ('runner.cli', 'runner.worker.run', "
            "'runner.worker.kinds', 'runner.worker.preload', 'torch') or m.startswith('runner.ml.') and m != 'runner.ml.config'); "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


# ---- the checks can fail: each rule against a small tree that breaks it ------------------------


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp / "runner" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


TABLE = [("low", ["runner.low"], []), ("pkg", ["runner.pkg", "runner.pkg.*"], ["low"]), ("top", ["runner.top"], ["low", "pkg"])]


def test_the_checks_catch_a_circle_an_upward_import_and_a_heavy_package_init(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from runner.top import g  # upward, and a circle with top\n",
        "top.py": "from runner import low\nfrom runner.pkg.a import x\n",
        "pkg/__init__.py": "from runner.pkg import a\n",  # a package init that imports: its importers import it too
        "pkg/a.py": "from . import b\nx = 1\n",
        "pkg/b.py": "from ..low import f\n",
    })
    graph = import_graph(root)
    assert graph["runner.top"] == {"runner.low": 1, "runner.pkg": 2, "runner.pkg.a": 2}
    assert graph["runner.pkg.a"] == {"runner.pkg.b": 1}
    assert graph["runner.pkg.b"] == {"runner.low": 1}
    assert cycles(graph) == [["runner.low", "runner.pkg", "runner.pkg.a", "runner.pkg.b", "runner.top"]]  # top -> pkg -> ... -> low -> top
    found = violations(graph, [*TABLE, ("root", ["runner"], [])], root)
    assert found == ["runner/low.py:2: runner.low (low) imports runner.top (top), which its layer may not import"]
    assert long_functions(root, limit=1) == ["runner/low.py:1 f (2 lines)"]


def test_the_table_is_read_from_the_page(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("x\n<!-- layer table start -->\n| layer | modules | may import |\n|---|---|---|\n"
                    "| low | `runner.low` | — |\n| top | `runner.top`, `runner.top.*` | low |\n<!-- layer table end -->\n")
    assert layer_table(page) == [("low", ["runner.low"], []), ("top", ["runner.top", "runner.top.*"], ["low"])]
    assert layer_of("runner.top.x", layer_table(page)) == "top" and layer_of("runner.topx", layer_table(page)) is None


@pytest.mark.parametrize("module, layer", [("runner.worker.launch", "worker start"), ("runner.worker.run", "worker"),
                                           ("runner.executors.specs", "contracts"), ("runner.executors.local", "executors")])
def test_the_longest_pattern_wins(module, layer):
    assert layer_of(module, layer_table()) == layer
