"""The package's import graph: layers flow one way and no module imports itself back, deferred imports included.

A function-local `from .qdq_graph import metadata` hides a cycle from the interpreter until the function runs
(graph_passes <-> qdq_graph did until 6173b04); this reads every import statement from the sources instead.
"""
from __future__ import annotations

import ast
from pathlib import Path

import dilatequant

PACKAGE = Path(dilatequant.__file__).parent
# core <- calibrate <- dq_export <- engines <- cli (README's package map); demo.py orchestrates like cli.py
LAYERS = ("core", "calibrate", "dq_export", "engines", "cli")
TRAINING_MAY_IMPORT = ("core", "calibrate")
BACKENDS = ("pytorch", "onnxruntime", "tensorrt", "triton")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute dilatequant.* names an ImportFrom can load: the module itself and, for `from . import x`, x."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the dilatequant modules it imports anywhere in its source (top level or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                targets |= set(_resolve(name, path.name == "__init__.py", node))
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package_init(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").is_file()


def test_the_graph_sees_deferred_imports():
    """The reader itself: a function-local import (layer_parity imports parity inside a function) is an edge."""
    g = import_graph()
    assert "dilatequant.dq_export.parity" in g["dilatequant.dq_export.layer_parity"]
    assert "dilatequant.dq_export.graph_passes" in g["dilatequant.dq_export.qdq_graph"]
    assert len(g) > 40, len(g)


def test_no_module_imports_itself_back():
    graph = import_graph()
    # a package __init__ re-exporting its submodules is not a cycle worth failing on; module <-> module is
    modules = {k: {t for t in v if not _is_package_init(t)} for k, v in graph.items() if not _is_package_init(k)}
    cycles = _cycles(modules)
    assert not cycles, f"import cycles (deferred imports included): {cycles}"


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_one_way():
    """core imports no other layer, calibrate never dq_export/engines/cli, dq_export never engines/cli, engines never
    cli; nothing but the cli side imports training, and training imports core and calibrate only."""
    wrong = []
    for mod, targets in import_graph().items():
        layer = _layer(mod)
        for t in targets:
            tl = _layer(t)
            if layer in LAYERS and tl in LAYERS and LAYERS.index(tl) > LAYERS.index(layer):
                wrong.append(f"{mod} -> {t}")
            if tl == "training" and layer not in ("training", "cli", "demo"):
                wrong.append(f"{mod} -> {t}")
            if layer == "training" and tl not in ("training", *TRAINING_MAY_IMPORT, ""):
                wrong.append(f"{mod} -> {t}")
    assert not wrong, wrong


def test_backends_import_only_the_base_and_themselves():
    """A runtime folder (engines/<runtime>/) never imports another runtime: runners.py is the one place that knows
    them all, as Polygraphy keeps backend/<runtime>/ apart. Triton is a server that hosts the others (a TensorRT
    plan's profile decides its config), so it may read them."""
    wrong = []
    for mod, targets in import_graph().items():
        parts = mod.split(".")
        if len(parts) < 3 or parts[1] != "engines" or parts[2] not in BACKENDS:
            continue
        for t in targets:
            tp = t.split(".")
            if (len(tp) > 2 and tp[1] == "engines" and tp[2] in BACKENDS and tp[2] != parts[2]
                    and parts[2] != "triton"):
                wrong.append(f"{mod} -> {t}")
    assert not wrong, wrong


def test_the_package_map_is_the_tree():
    """The layers and backends these tests check are the folders that exist (a renamed folder fails here)."""
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == {*LAYERS[:-1], "training"}, folders
    backends = {p.name for p in (PACKAGE / "engines").iterdir() if (p / "__init__.py").is_file()}
    assert backends == set(BACKENDS), backends


def test_every_import_names_a_module_that_exists():
    """A moved module leaves deferred `from ..x import y` lines pointing nowhere; the interpreter finds out only when
    the function runs. Every dilatequant.* module an import statement names must be a file in the tree."""
    files = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    missing = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dilatequant")):
                base = _resolve(name, path.name == "__init__.py", node)[0]
                if base not in files:
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {base}")
            elif isinstance(node, ast.Import):
                missing += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {a.name}" for a in node.names
                            if a.name.startswith("dilatequant") and a.name not in files]
    assert not missing, missing
