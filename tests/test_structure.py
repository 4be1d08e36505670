"""The package's shape: no import circles (function-local imports included), function-local
imports only where they keep `import mergekit` light, each with its reason on its line, and
installing the plugin costs `import mergekit` little."""

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import mergekit_permute

PKG = Path(mergekit_permute.__file__).parent
MAX_LOCAL_IMPORTS = 40


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path) -> List[Tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import statement."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    root = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*root, base] if base else root)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                           for a in child.names]
            for target in targets:
                if target.split(".")[0] == "mergekit_permute" or not target.startswith("mergekit"):
                    found.append((target, child.lineno, local))
            visit(child, inside)
    visit(ast.parse(path.read_text()), False)
    return found


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        edges = set()
        for target, _, _ in _imports(name, path):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            edges.add(target)
            # importing a.b.c runs the packages a.b's __init__ too (unless we are inside it)
            parent = target.rpartition(".")[0]
            while parent and parent != "mergekit_permute" and not name.startswith(parent + "."):
                edges.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = edges - {name}
    return graph


def test_no_import_circles():
    graph, state, stack = _graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_function_local_imports_are_few_and_give_their_reason():
    local = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        local.append((name, inner.lineno, lines[inner.lineno - 1]))
    local = sorted(set(local))
    assert len(local) <= MAX_LOCAL_IMPORTS, f"{len(local)} function-local imports"
    silent = [f"{n}:{line}" for n, line, text in local if "#" not in text]
    assert not silent, f"function-local imports without a reason: {silent}"


def _loaded_by_import_mergekit(disable: str) -> Set[str]:
    code = "import sys, mergekit.merge, mergekit.merge_methods; print(' '.join(sys.modules))"
    env = {**os.environ, "MERGEKIT_PERMUTE_DISABLE": disable}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    return set(out.stdout.split())


def test_the_plugin_keeps_import_mergekit_light():
    """With the plugin, `import mergekit.merge` also loads the hooks, the method, the settings
    and the spec, and nothing of the alignment machinery (its time: BENCHMARKS.md)."""
    extra = _loaded_by_import_mergekit("0") - _loaded_by_import_mergekit("1")
    assert "mergekit_permute.mergekit.method" in extra
    ours = {m for m in extra if m.startswith("mergekit_permute")}
    assert all(m.split(".")[1] in ("mergekit", "settings", "spec") for m in ours), sorted(ours)
    heavy = {m for m in extra if m.split(".")[0] in ("scipy", "matplotlib", "datasets", "accelerate")}
    assert not heavy, sorted(heavy)
