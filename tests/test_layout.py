"""The package's layout, read from the source with `ast` (nothing under pdcheck/ is imported):
no import cycles, a bottom layer (pdcheck/types.py) that imports nothing from pdcheck, a module
docstring in every module, and no product module that leans on test-only code (pdcheck.testing).

Every import counts, at module level, inside a function or under TYPE_CHECKING alike: an import
hidden in a function is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pdcheck"
TESTING = "pdcheck.testing"
NOT_PRODUCT = ("testing", "bench")  # pdcheck/<folder>/: test-only code and benchmarks


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a name it imports: a module, or a module's attribute as `module.name`
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path) -> list[Import]:
    """Everything `path` imports, relative imports resolved against its package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.append(Import(name, base, node.lineno))
            found += [Import(name, f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph() -> dict[str, list[Import]]:
    """Per module, its imports of other pdcheck modules."""
    known = modules()
    return {name: [i for i in imports(name, path) if i.target in known and i.target != name]
            for name, path in known.items()}


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(cycle: list[str], graph: dict[str, list[Import]]) -> str:
    edges = sorted({f"    {i.source} -> {i.target} (line {i.line})" for name in cycle for i in graph[name]
                    if i.target in cycle})
    return "cycle: " + " ".join(cycle) + "\n" + "\n".join(edges)


def is_product(path: Path) -> bool:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) > 1 and parts[0] in NOT_PRODUCT:
        return False
    is_test_file = parts[-1].startswith("test_") or parts[-1] == "conftest.py"
    return not (parts[0] == "conformance" and is_test_file)


def test_no_module_of_pdcheck_is_part_of_an_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, f"{len(found)} import cycles in pdcheck (move what both sides need down a layer):\n" + \
        "\n".join(describe(cycle, graph) for cycle in found)


def test_the_bottom_layer_pdcheck_types_imports_nothing_from_pdcheck():
    path = PACKAGE / "types.py"
    found = [i for i in imports("pdcheck.types", path) if i.target.split(".")[0] == "pdcheck"]
    assert not found, "pdcheck/types.py must import nothing from pdcheck:\n" + \
        "\n".join(f"    line {i.line}: {i.target}" for i in found)


def test_every_module_under_pdcheck_states_its_contract_in_a_docstring():
    missing = [str(path.relative_to(ROOT)) for path in modules().values()
               if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()]
    assert not missing, "modules with no module docstring:\n" + "\n".join(f"    {m}" for m in missing)


def test_no_product_module_imports_the_test_only_package_pdcheck_testing():
    found = [f"    {path.relative_to(ROOT)}:{i.line}: {i.target}"
             for name, path in modules().items() if is_product(path)
             for i in imports(name, path) if i.target == TESTING or i.target.startswith(TESTING + ".")]
    assert not found, f"product modules import {TESTING} (test-only code):\n" + "\n".join(sorted(set(found)))
