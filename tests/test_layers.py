"""Imports point down the layers (docs/architecture.md), and the library never imports the app."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "robustkd"

# bottom to top; a module may import its own layer and the ones below, never above
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["__init__", "errors", "registry", "atomic"]),
    ("data", ["data"]),
    ("models", ["models"]),
    ("attacks", ["attacks"]),
    ("analysis", ["analysis"]),
    ("training", ["training"]),
    ("defences", ["defenses"]),
    ("runs and figures", ["runs", "viz"]),
    ("experiments", ["experiments"]),
    ("command line", ["cli", "__main__"]),
]
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def _top(source: Path) -> str:
    rel = source.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if len(rel.parts) > 1 else rel.name


def _imports(source: Path) -> list[tuple[str, int]]:
    """Every ``robustkd.X`` imported anywhere in ``source`` (functions included), with lines."""
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "robustkd":
                found += [(alias.name, node.lineno) for alias in node.names]
            elif node.module.startswith("robustkd."):
                found.append((node.module.split(".")[1], node.lineno))
        elif isinstance(node, ast.Import):
            found += [
                (alias.name.split(".")[1], node.lineno)
                for alias in node.names
                if alias.name.startswith("robustkd.")
            ]
    return found


def test_every_module_has_a_layer() -> None:
    missing = {_top(f) for f in PACKAGE.rglob("*.py")} - set(LAYER)
    assert not missing, f"give these modules a layer in tests/test_layers.py: {sorted(missing)}"


def test_imports_only_point_down() -> None:
    upward = []
    for source in sorted(PACKAGE.rglob("*.py")):
        me = _top(source)
        if me == "__init__" and source.parent == PACKAGE:
            continue  # the package's front door re-exports from every layer
        for name, line in _imports(source):
            if name in LAYER and LAYER[name] > LAYER[me]:
                upward.append(
                    f"{source.relative_to(ROOT)}:{line} {me} ({LAYERS[LAYER[me]][0]}) imports "
                    f"{name} ({LAYERS[LAYER[name]][0]})"
                )
    assert not upward, "\n".join(upward)


def test_the_library_never_imports_the_app_or_streamlit() -> None:
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                assert n.split(".")[0] not in ("streamlit", "app", "pages"), (source, n)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from robustkd.cli import main\n    import robustkd.runs\n")
    assert [n for n, _ in _imports(probe)] == ["cli", "runs"]
