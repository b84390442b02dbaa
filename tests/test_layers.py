"""The package's layers: each module imports only from its own layer or the ones below.

    0  errors, utils            (no hylorada imports but errors)
    1  nn, layers, config, losses
    2  assets, data, evaluate
    3  adapters, compress       (compress: math + save/load; recovery is a recipe)
    4  loading, model
    5  train, checkpoint, optim
    6  recipes (benchmark/ inside)
    7  commands, cli

Imports inside functions count too (a lazy import is still a dependency). KNOWN_UPWARD lists the
edges that remain to be removed (issue 12); the test fails on any other upward edge, and also
when a listed edge is gone (so the list only shrinks).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hylorada"
LAYERS = [
    {"errors", "utils"},
    {"nn", "layers", "config", "losses"},
    {"assets", "data", "evaluate"},
    {"adapters", "compress"},
    {"loading", "model"},
    {"train", "checkpoint", "optim"},
    {"recipes"},
    {"commands", "cli"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges() -> set[tuple[str, str, str]]:
    """(importing top-level part, imported top-level part, where) over every file of hylorada/."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                t = _target(module, is_package, node) if node.level else (node.module or "")
                targets = [t] if node.module else [f"{t}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                src, dst = module.split("."), t.split(".")
                if dst[0] == "hylorada" and len(src) > 1 and len(dst) > 1 and src[1] != dst[1]:
                    edges.add((src[1], dst[1], f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"))
    return edges


def test_every_module_is_in_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts - set(LEVEL) == set(), "add the new module to LAYERS in tests/test_layers.py"


def test_no_import_runs_upward():
    upward = {(a, b, where) for a, b, where in import_edges()
              if b in LEVEL and a in LEVEL and LEVEL[b] > LEVEL[a]}
    new = sorted(e for e in upward if e[:2] not in KNOWN_UPWARD)
    assert new == [], f"imports that run upward (a lower layer importing a higher one): {new}"
    gone = KNOWN_UPWARD - {e[:2] for e in upward}
    assert gone == set(), f"remove these from KNOWN_UPWARD, they are fixed: {sorted(gone)}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walker finds a lazy import inside a function (the kind that hides best)."""
    fake = tmp_path / "hylorada"
    (fake / "nn").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "nn" / "__init__.py").write_text("")
    (fake / "nn" / "bad.py").write_text("def f():\n    from ..train import train\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert ("nn", "train", "hylorada/nn/bad.py:2") in import_edges()
