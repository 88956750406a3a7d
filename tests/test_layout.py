"""The modules' floors (docs/layout.md): no module imports from a floor above
its own, every module has a floor, and the layout page names every module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxent"

# Module -> floor; a new module is one line here (and a row in docs/layout.md).
FLOORS = {
    # 0: helpers
    "_args": 0,
    "_numerics": 0,
    "_reduction": 0,
    "_sharding": 0,
    "_backend": 0,
    "_define": 0,
    # 1: the loss families
    "_softmax": 1,
    "_cross_entropy": 1,
    "_sigmoid": 1,
    "_divergence": 1,
    "_distill": 1,
    "_topk": 1,
    # 2: the streaming engine
    "_streaming": 2,
    "_pallas_linear": 2,
    # 3: the fused heads
    "_linear": 3,
    "_linear_distill": 3,
    "_log_probs": 3,
    "_linear_topk": 3,
    # 4: the public surface
    "__init__": 4,
    "reference": 4,
}


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _imports(name: str) -> set[str]:
    """The jaxent modules that ``jaxent/<name>.py`` imports, wherever in the
    file (function-level imports included)."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("jaxent"):
                continue
            parts = (node.module or "").split(".")
            if node.level == 0:
                parts = parts[1:]  # jaxent.x -> x
            if parts and parts[0]:
                found.add(parts[0])
            else:  # from . import x, y
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "jaxent" and len(parts) > 1:
                    found.add(parts[1])
    return found - {name}


def test_every_module_has_a_floor():
    assert set(_modules()) == set(FLOORS), (
        "add the new module to FLOORS (and to docs/layout.md); remove a deleted one"
    )


@pytest.mark.parametrize("name", _modules())
def test_no_module_imports_from_a_higher_floor(name):
    floor = FLOORS[name]
    above = {m: FLOORS[m] for m in _imports(name) if FLOORS.get(m, -1) > floor}
    assert not above, f"{name} (floor {floor}) imports from higher floors: {above}"


def test_imports_are_found():
    """The parser sees both import forms the package uses."""
    assert {"_sharding"} <= _imports("_define")
    assert {"_cross_entropy", "_sigmoid", "_define"} <= _imports("reference")


def test_layout_page_names_every_module():
    page = (ROOT / "docs" / "layout.md").read_text()
    missing = [m for m in _modules() if f"`{m}.py`" not in page]
    assert not missing, missing
