"""The package's import direction, read from the source with `ast` (nothing is imported or run).

Bottom up: `raysseg.storage` (files) and `raysseg.config` import nothing of raysseg; the run-dir
package `raysseg.rundir` imports only those two and itself; no two modules import each other in a
circle. That the core never loads Ray is tests/test_core_imports.py's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import raysseg

PACKAGE_ROOT = Path(raysseg.__file__).parent
BOTTOM = ("raysseg.storage", "raysseg.config", "raysseg.errors")


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = ("raysseg", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _imported(module: str) -> set[str]:
    """The raysseg modules `module` imports anywhere in its file, inside functions too (`from a.b
    import c` names a.b.c when it is a module)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("raysseg")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "raysseg":
                continue
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
    return found


def test_the_module_list_holds_the_layers() -> None:
    assert {"raysseg.storage", "raysseg.config", "raysseg.rundir.layout"} <= set(MODULES)
    assert len(MODULES) > 40


def test_storage_and_config_import_nothing_of_raysseg_but_the_error_base() -> None:
    for module in BOTTOM:
        assert _imported(module) <= {"raysseg.errors"}, module
    assert _imported("raysseg.errors") == set()


def test_the_run_dir_package_imports_only_storage_config_and_itself() -> None:
    rundir = [name for name in MODULES if name.startswith("raysseg.rundir")]
    assert len(rundir) >= 5
    for module in rundir:
        above = {
            name
            for name in _imported(module)
            if name not in BOTTOM and not name.startswith("raysseg.rundir")
        }
        assert not above, f"{module} imports {sorted(above)}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that ends where it starts), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every edge is explored

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target, path)) is not None:
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])) is not None:
            return cycle
    return None


def test_no_import_cycle_among_raysseg_modules() -> None:
    # Every import counts, those inside functions too: a lazy import that dodges a circle at load
    # time is still an arrow that runs back up.
    graph = {module: {name for name in _imported(module) if name in MODULES} for module in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
