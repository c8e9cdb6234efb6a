"""hpodlb's modules import each other in one direction: no circle, and the core never imports a
command. Read from the import statements themselves, those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hpodlb"
# The commands (and their own helpers) and the entry points: whatever sits above the core.
COMMANDS = {"__main__", "cli", "cliaws", "commandline", "checks", "doctor", "doctoraws",
            "diagnose", "diagnosenode", "drain", "keyadmin"}  # fmt: skip


def _imports() -> dict[str, set[str]]:
    """Module -> the hpodlb modules it imports at run time (TYPE_CHECKING blocks left out)."""
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    assert {"reconcile", "cli", "planner"} <= set(modules), f"no hpodlb package at {PACKAGE}"
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "hpodlb":
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpodlb."):
                found = [(node.module or "").split(".")[1]]
            elif isinstance(node, ast.Import):
                found = [a.name.split(".")[1] for a in node.names if a.name.startswith("hpodlb.")]
            else:
                continue
            edges[name] |= {m for m in found if m in modules and m != name}
    return edges


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No import circle, however long, lazy imports included."""
    edges = _imports()
    circles = []
    for start in edges:
        seen, todo = set(), list(edges[start])
        while todo:
            module = todo.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(edges[module])
    assert circles == []


def test_the_core_never_imports_a_command() -> None:
    """Commands use the core; the core (the pass, the adapters, the daemon) never uses them."""
    edges = _imports()
    found = sorted(
        f"{m} -> {t}" for m, ts in edges.items() if m not in COMMANDS for t in ts if t in COMMANDS
    )
    assert found == []
