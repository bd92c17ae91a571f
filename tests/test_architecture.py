"""The packages form a stack with no loop (read from the source with ``ast``, lazy imports
inside functions included): the base (``harness.base``) at the bottom, then ``metrics``, then
``methods``, then ``checks``, then the runner (the rest of ``harness``). No module imports a
``_private`` name or module from another module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "checks", "metrics")
LAYERS = ("harness.base", "metrics", "methods", "checks", "harness")  # bottom to top


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = module_files()


def imported(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every project import in a file; name is "" for ``import module``."""
    pairs = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            pairs += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in pairs if m.split(".")[0] in PACKAGES]


def target(module: str, name: str) -> str:
    """The module an import loads: ``from a import b`` loads ``a.b`` when that is a module."""
    return f"{module}.{name}" if f"{module}.{name}" in MODULES else module


def edges() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, imported_name in imported(path):
            graph[name].add(target(module, imported_name))
    return graph


def package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS)
                if module == layer or module.startswith(layer + "."))


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (a list of nodes, first = last), or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_loop_between_modules():
    assert find_cycle(edges()) == []


def test_no_loop_between_packages():
    graph: dict[str, set[str]] = {}
    for module, targets in edges().items():
        for other in targets:
            if package_of(other) != package_of(module):
                graph.setdefault(package_of(module), set()).add(package_of(other))
    assert find_cycle(graph) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_stack(module):
    """The base imports nothing above it, metrics no method, methods no check, checks nothing
    of the runner."""
    above = [other for other in edges()[module] if layer_of(other) > layer_of(module)]
    assert above == [], f"{module} ({LAYERS[layer_of(module)]}) imports {above}"


@pytest.mark.parametrize("path", sorted([*MODULES.values(), *(ROOT / "scripts").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_from_another_module(path):
    private = [f"{module}.{name}".rstrip(".") for module, name in imported(path)
               if name.startswith("_") or any(p.startswith("_") for p in module.split("."))]
    assert private == []
