"""The package's shape: its import graph has no circle, each floor imports only the floors below
it, and nothing outside ``minidress.app`` imports the application. Read with ``ast`` from the
source, so nothing is imported to check it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "minidress"

# What each floor may import, besides itself. Lower floors never import higher ones.
FLOORS = {
    "minidress.validate": set(),
    "minidress.fileio": set(),
    "minidress.im2col": set(),
    "minidress.masks": set(),
    "minidress.checkpoint": {"minidress.fileio"},
    "minidress.data": {"minidress.fileio", "minidress.validate"},
    "minidress.kernels": {"minidress.im2col", "minidress.fileio"},   # fileio: the cache guard
    "minidress.nn": {"minidress.im2col", "minidress.kernels", "minidress.checkpoint", "minidress.data",
                     "minidress.fileio", "minidress.validate"},
    "minidress.dress": {"minidress.nn", "minidress.masks", "minidress.kernels", "minidress.im2col",
                        "minidress.checkpoint", "minidress.data", "minidress.fileio", "minidress.validate"},
    "minidress.deploy": {"minidress.nn.layers", "minidress.nn.models", "minidress.masks",
                         "minidress.kernels", "minidress.im2col", "minidress.checkpoint",
                         "minidress.fileio", "minidress.validate"},
    "minidress.baselines": {"minidress.dress", "minidress.nn", "minidress.masks", "minidress.kernels",
                            "minidress.im2col", "minidress.checkpoint", "minidress.data",
                            "minidress.fileio", "minidress.validate"},
    "minidress.pruning": {"minidress.dress", "minidress.nn", "minidress.masks", "minidress.kernels",
                          "minidress.im2col", "minidress.checkpoint", "minidress.data",
                          "minidress.fileio", "minidress.validate"},
    "minidress.quantize": {"minidress.pruning", "minidress.dress", "minidress.nn", "minidress.masks", "minidress.kernels",
                           "minidress.im2col", "minidress.checkpoint", "minidress.data",
                           "minidress.fileio", "minidress.validate"},
    "minidress.app": {"minidress"},          # the top floor may import anything
}
# Imports inside a function: only heavy optional dependencies loaded on demand, with a reason.
LAZY_ALLOWED = {"torch", "scipy", "onnx", "matplotlib", "sklearn"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set):
    """``(target module, line, inside a function)`` for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:      # ``from pkg import module`` imports the module
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno, id(node) in in_function


def graph() -> dict:
    """Edges between minidress modules; importing ``a.b.c`` also runs the ``__init__`` of every
    package above it that the importer is not already inside."""
    mods = modules()
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, _ in imports_of(name, path, set(mods)):
            if not target.startswith("minidress.") or target not in mods:
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                pkg = ".".join(parts[:i])
                if pkg in mods and not name.startswith(pkg + ".") and pkg != name:
                    edges[name].add(pkg)
    return edges


def find_circle(edges):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def floor_of(name):
    return max((f for f in FLOORS if name == f or name.startswith(f + ".")), key=len, default=None)


def test_the_import_graph_has_no_circle():
    circle = find_circle(graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_find_circle_finds_one():
    """The checker itself: a planted circle is found, a chain is not."""
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_has_a_floor():
    assert [m for m in modules() if m != "minidress" and floor_of(m) is None] == []


def test_each_floor_imports_only_the_floors_below_it():
    wrong = []
    for name, targets in graph().items():
        if name == "minidress":
            continue
        own, allowed = floor_of(name), FLOORS[floor_of(name)]
        for t in targets:
            if floor_of(t) == own or t == "minidress":
                continue
            # a package's __init__ runs on the way to an allowed module inside it
            if not any(t == a or t.startswith(a + ".") or a.startswith(t + ".") for a in allowed):
                wrong.append(f"{name} imports {t}")
    assert wrong == []


def test_nothing_outside_app_imports_the_application():
    offenders = [f"{n} imports {t}" for n, ts in graph().items() for t in ts
                 if t.startswith("minidress.app") and not n.startswith("minidress.app")]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_function_level_imports_are_optional_heavy_dependencies_with_a_reason(name):
    path = modules()[name]
    lines = path.read_text().splitlines()
    for target, line, lazy in imports_of(name, path, set(modules())):
        if not lazy:
            continue
        assert target.split(".")[0] in LAZY_ALLOWED, f"{path.name}:{line} imports {target} inside a function"
        reason = lines[line - 1] + lines[line - 2]
        assert "#" in reason, f"{path.name}:{line}: say in a comment why {target} is imported here"
