"""autosdpa's modules import each other without a cycle, counting every import statement -- at module level or
inside a function (a function-level import that dodges a cycle is still one). Relative and absolute imports of
autosdpa's own modules are resolved to the module they name; a package's implicit import by its submodules is
Python's mechanics, not an edge."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autosdpa")


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return mods


_EXTENSIONS = {"autosdpa." + f[:-2] for f in os.listdir(ROOT) if f.endswith(".c")}  # built from autosdpa/*.c


def _edges(name: str, path: str, mods: dict[str, str]) -> set[str]:
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            # ``from x import y``: y may be a submodule of x (ours, or a C extension: no edge), else a name in x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                       if f"{base}.{a.name}" not in _EXTENSIONS]
        else:
            continue
        out |= {t for t in targets if t in mods and t != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_function_level_ones_included():
    mods = _modules()
    graph = {name: _edges(name, path, mods) for name, path in mods.items()}
    assert "autosdpa.forms" in graph["autosdpa.dispatch"]  # the graph is really read
    assert _cycles(graph) == []


def test_problem_and_reference_import_no_form():
    mods = _modules()
    for name in ("autosdpa.problem", "autosdpa.reference"):
        assert not {m for m in _edges(name, mods[name], mods) if m.startswith("autosdpa.forms")}


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
