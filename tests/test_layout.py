"""The package's layering, read from the source's imports (AST): the library core never imports the
application layer (modsplit.app), the Triton kernels import only the library's leaf modules, and
no import circle exists among modsplit's modules (imports inside functions included)."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {"modsplit.__main__"}  # `python -m modsplit`: runs the CLI, imported by nothing


def _modules():
    """{module name: path} of modsplit/ and of triton_kernels/ (as modsplit.triton_kernels)."""
    found = {}
    for folder, package in (("modsplit", "modsplit"), ("triton_kernels", "modsplit.triton_kernels")):
        root = os.path.join(REPO, folder)
        for dirpath, _, names in os.walk(root):
            for name in names:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join([package, *rel])] = os.path.join(dirpath, name)
    return found


MODULES = _modules()


def _imports(name, path):
    """The modsplit modules `name` imports anywhere in its file (absolute and relative)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod when one exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_app(name):
    return name == "modsplit.app" or name.startswith("modsplit.app.")


def test_the_graph_is_read():
    # guards the test itself: these edges exist, so a parser that found none would fail here
    assert "modsplit.decompose" in GRAPH["modsplit.app.commands"]
    assert "modsplit.triton_kernels.utils" in GRAPH["modsplit.triton_kernels.masked_linear"]
    assert len(MODULES) > 30


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not _is_app(n)
                                        and n not in ENTRY_POINTS))
def test_core_never_imports_the_app(name):
    back = sorted(t for t in GRAPH[name] if _is_app(t))
    assert not back, f"library module {name} imports the application layer: {back}"


def test_triton_kernels_need_no_compiled_extension():
    # the package itself, mask geometry, the routing thresholds, and the pure-PyTorch expanded
    # path that the Triton kernels feed above the fused-row threshold (none of them needs _C)
    allowed = {"modsplit", "modsplit.reference", "modsplit.routing", "modsplit.torch_backend"}
    for name in (n for n in MODULES if n.startswith("modsplit.triton_kernels")):
        outside = {t for t in GRAPH[name] if not t.startswith("modsplit.triton_kernels")}
        assert outside <= allowed, f"{name} imports {sorted(outside - allowed)}"


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan), i.e. the circles.
    A package's __init__ importing its own submodules is not a circle unless a submodule imports
    its package back, which counts."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_edges(graph):
    """Drop the edges from a module to a package that contains it (`from modsplit import x` in
    modsplit.y loads modsplit/__init__ first, which Python allows): such an edge only matters if
    the package's __init__ then needs the importing module, and the remaining graph still sees
    that through the __init__'s own edges."""
    return {v: {w for w in ws if not v.startswith(w + ".")} for v, ws in graph.items()}


def test_no_import_circles():
    assert _cycles(_without_package_edges(GRAPH)) == []


def test_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_machine_specific_paths():
    import subprocess
    hits = subprocess.run(["git", "grep", "-n", "-I", "-E", r"(/wor[k]/|/hom[e]/[a-z]|/User[s]/)"],
                          cwd=REPO, capture_output=True, text=True)
    if hits.returncode not in (0, 1):
        pytest.skip(f"not a git checkout: {hits.stderr.strip()}")
    assert hits.stdout == ""
