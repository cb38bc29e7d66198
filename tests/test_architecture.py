"""The package's import graph: no cycles among module-level imports, and imports only point down.

Every module of ``npystream`` is parsed (``ast``, nothing is imported) and each
``import`` is collected, module-level and inside functions.  The layers below
are the map of ``docs/architecture.md``; a module may import its own layer or
any layer below it, never one above (a function-level import counts too: it
still makes a format depend on its users).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "npystream"

# Lowest first.  A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("npystream.errors",)),
    ("helpers", ("npystream._accel", "npystream._speedups", "npystream._atomic", "npystream._progress")),
    ("sources", ("npystream.sources",)),
    # optional bridges to pyarrow / awkward over plain buffers (the ragged store calls them)
    ("bridges", ("npystream.interop",)),
    ("formats", ("npystream.formats",)),
    ("uses", (
        "npystream.elements", "npystream.archive", "npystream.objects", "npystream.object_array", "npystream.conversion",
        "npystream.parallel_convert", "npystream.verification", "npystream.deferred",
        "npystream.concatenation", "npystream.loader", "npystream.torch", "npystream.dask",
        "npystream.demo",
    )),
    ("api", ("npystream.api", "npystream")),
    ("cli", ("npystream.cli", "npystream.__main__")),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of ``module`` (the longest prefix wins); KeyError for an unmapped module."""
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        raise KeyError(module)
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules imported at module level, modules imported anywhere), restricted to ``known``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    anywhere: set[str] = set()

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" imports pkg.mod when that is a module
            return [base] + [f"{base}.{a.name}" for a in node.names]
        return []

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # typing only: never executed
            for target in targets(child):
                mod = resolve(target)
                if mod is None or mod == name:
                    continue
                anywhere.add(mod)
                if not inner:
                    top.add(mod)
            visit(child, inner)

    visit(tree, False)
    return top, anywhere


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def test_every_module_has_a_layer():
    unmapped = [m for m in modules() if not _has_layer(m)]
    assert not unmapped, f"add these modules to LAYERS in tests/test_architecture.py: {unmapped}"


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


# Cycles through function-level imports that exist today (each is a pair of modules that should
# become one, or share a lower module); a new one fails test_no_new_cycles_through_any_import.
KNOWN_LAZY_CYCLES = {
    frozenset({"npystream.formats.pickle_walk", "npystream.formats.pickle_stream"}),  # the engine's split
    frozenset({"npystream.deferred", "npystream.concatenation"}),  # lazy concat <-> concat of lazies
}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found by a depth-first walk (each as a closed path: first == last)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m)
    return cycles


def _edges(graph: dict[str, tuple[set[str], set[str]]], which: int) -> dict[str, set[str]]:
    # Importing a submodule first runs its package's __init__; that edge is not a dependency.
    return {m: {t for t in imps[which] if not m.startswith(t + ".")} for m, imps in graph.items()}


def test_no_new_cycles_through_any_import(graph):
    """Function-level imports too: a cycle there is still two modules that need each other."""
    new = [c for c in find_cycles(_edges(graph, 1)) if frozenset(c) not in KNOWN_LAZY_CYCLES]
    assert not new, "import cycles: " + "; ".join(" -> ".join(c) for c in new)


def test_no_cycles_among_module_level_imports(graph):
    """A module-level import cycle makes import order matter (and half-initialised modules)."""
    cycles = find_cycles(_edges(graph, 0))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_point_down(graph):
    """No module imports a higher layer (a format never imports the API, the CLI or conversion)."""
    upward = []
    for m, (_, anywhere) in sorted(graph.items()):
        for t in sorted(anywhere):
            if m.startswith(t + "."):
                continue  # its own package's __init__
            if layer_of(t) > layer_of(m):
                upward.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checker_sees_violations(tmp_path):
    """The walker finds function-level imports and relative ones (so the tests above can fail)."""
    src = tmp_path / "npystream" / "formats" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("from . import npy\n\ndef f():\n    from npystream import api\n    import npystream.cli\n")
    known = {"npystream", "npystream.api", "npystream.cli", "npystream.formats", "npystream.formats.npy"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "npystream"
    try:
        top, anywhere = imports_of(src, "npystream.formats.x", known)
    finally:
        PACKAGE = saved
    assert top == {"npystream.formats", "npystream.formats.npy"}
    assert {"npystream.api", "npystream.cli"} <= anywhere
    assert layer_of("npystream.api") > layer_of("npystream.formats.x")
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
