"""The arrows point one way: the core never imports the demo world (compinv_rt.world)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compinv_rt"
CORE = ("train", "spatial", "runtime", "export", "models")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_core_never_imports_the_world():
    offenders = [f"{p.relative_to(PACKAGE.parent)}: {name}"
                 for pkg in CORE for p in sorted((PACKAGE / pkg).rglob("*.py"))
                 for name in _imports(p) if name == "compinv_rt.world" or
                 name.startswith("compinv_rt.world.")]
    assert offenders == []


def test_no_behaviour_hangs_on_a_world_file():
    """The world's vocabulary travels in the model's metadata (models.loading.METADATA_FILE)."""
    hits = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
            if "shapes_world.json" in p.read_text() and p.parent.name != "world"]
    assert hits == []
