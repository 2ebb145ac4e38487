"""The layers hold: every module imports only from its own layer or those below, a stage never
imports another stage, an engine never imports a stage, and no two modules import each other
(directly or around a circle). Imports inside functions count: a late import is still an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module belongs to the first layer with a prefix it starts with.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("schemas", "trainer")),
    ("core", ("pipeline.errors", "pipeline.config", "pipeline.choices", "pipeline.reporting",
              "pipeline.allocator", "pipeline.children", "pipeline.ahead")),
    ("store", ("pipeline.store",)),
    ("sources", ("pipeline.sources", "pipeline.synthetic")),
    ("features", ("pipeline.features",)),
    ("encoding", ("pipeline.encoding",)),
    ("evaluation", ("pipeline.evaluation",)),
    ("runs", ("pipeline.runs",)),
    ("renderers", ("pipeline.present.names", "pipeline.present.html", "pipeline.present.figures",
                   "pipeline.present.card")),
    ("engines", ("pipeline.engines",)),
    ("stages", ("pipeline.stages",)),
    ("compositions", ("pipeline.compositions",)),
    ("interface", ("pipeline.present.terminal", "pipeline.api", "pipeline.cli", "pipeline")),
]
PACKAGES = ("pipeline", "trainer", "schemas")


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports, resolved to modules (`from a.b import c` is a.b.c when c is
    a module, else a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up `level - 1` packages from this one
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name}


def layer_of(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS"
    return best[0]


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {name: imports(path, name, known) for name, path in found.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            la, lb = layer_of(a), layer_of(b)
            if lb > la:
                problems.append(f"{a} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]}), a layer above it")
            elif la == lb and LAYERS[la][0] == "stages" and a != "pipeline.stages" and b != "pipeline.stages":
                problems.append(f"stage {a} imports stage {b}: move what they share down a layer")
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each reported once (from its smallest module)."""
    found: list[list[str]] = []
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    if min(path) == start:
                        found.append([*path, start])
                elif nxt not in path and nxt > start:
                    stack.append((nxt, [*path, nxt]))
    return found


def test_every_module_imports_only_its_layer_or_below_and_no_stage_imports_a_stage() -> None:
    edges = graph()
    assert "pipeline.stages.train" in edges and "pipeline.cli" in edges  # the parse found the code
    assert violations(edges) == []


def test_the_import_graph_has_no_circle() -> None:
    assert cycles(graph()) == []


def test_foundation_packages_know_nothing_of_the_pipeline() -> None:
    edges = graph()
    leaks = {a: sorted(b for b in targets if b.startswith("pipeline"))
             for a, targets in edges.items() if a.split(".")[0] in ("trainer", "schemas")}
    assert {a: b for a, b in leaks.items() if b} == {}


@pytest.mark.parametrize("planted, expected", [
    ("from pipeline.stages import train\n", "stage pipeline.stages.score imports stage pipeline.stages.train"),
    ("from pipeline.cli import app\n", "a layer above it"),
])
def test_the_check_fails_on_a_planted_edge(tmp_path: Path, planted: str, expected: str) -> None:
    """The rule is not vacuous: one planted import in a copy of the tree is found."""
    import shutil

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "pipeline" / "stages" / "score.py"
    target.write_text(target.read_text() + "\n\ndef _planted() -> None:\n    " + planted)
    assert any(expected in v for v in violations(graph(tmp_path)))


def test_a_planted_circle_is_found(tmp_path: Path) -> None:
    import shutil

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    lock = tmp_path / "pipeline" / "store" / "lock.py"
    lock.write_text(lock.read_text() + "\n\ndef _planted() -> None:\n    from pipeline.store import writes\n")
    assert any("pipeline.store.lock" in c and "pipeline.store.writes" in c for c in cycles(graph(tmp_path)))
