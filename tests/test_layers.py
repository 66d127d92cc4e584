"""The import graph of pdeds points downwards: no module imports a layer above its own.

Layers, lowest first (a module may import its own layer and those below). Lower layers
(physics, models, data, multigrid, optim) therefore import nothing from train, plan, study,
report, cli or testing. Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PDEDS = Path(__file__).resolve().parent.parent / "pdeds"
LAYERS = [
    {"__init__", "errors", "machine", "distributed", "dsutil", "dsconfig"},
    {"physics"},
    {"models", "data", "multigrid", "optim"},
    {"config"},
    {"train", "testing"},
    {"plan", "study", "report"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def part(path: Path) -> str:
    """The top-level piece of pdeds a file belongs to: its package, or its module name."""
    first = path.relative_to(PDEDS).parts[0]
    return first.removesuffix(".py")


def imported_parts(tree: ast.AST) -> set[str]:
    """Top-level pieces of pdeds that ``tree`` imports (``from pdeds import x`` -> x, or the
    package itself when x is a name defined there, such as ``__version__``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "pdeds":
                names = [f"pdeds.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "pdeds":
                piece = pieces[1] if len(pieces) > 1 else "__init__"
                out.add(piece if piece in LEVEL else "__init__")
    return out


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PDEDS.rglob("*.py")):
        own = part(path)
        assert own in LEVEL, f"{path}: pdeds.{own} is in no layer; add it to LAYERS"
        for piece in imported_parts(ast.parse(path.read_text())):
            if LEVEL[piece] > LEVEL[own]:
                upward.append(f"{path.relative_to(PDEDS.parent)} imports pdeds.{piece}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_check_sees_every_kind_of_import():
    code = "def f():\n    from pdeds.train import trainer\nfrom pdeds import plan, __version__\n"
    assert imported_parts(ast.parse(code + "import pdeds.cli.train\n")) == {
        "train",
        "plan",
        "__init__",
        "cli",
    }
    assert LEVEL["physics"] < LEVEL["train"] < LEVEL["plan"] < LEVEL["cli"]
