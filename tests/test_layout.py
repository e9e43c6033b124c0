"""The project's layering, read from the source: no import cycle between its modules (imports inside functions
count too: a cycle hidden behind a function-level import is still a cycle), and the bottom packages import nothing
above them."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "modules", "engine", "dataloaders", "seg_segmentation", "preprocess", "demo", "benchmarks")
SKIP = {".venv", "tests", "build", "checkpoints", "data", "output"}


def project_modules() -> dict:
    """module name -> path, for every .py file of the project (packages and the top-level scripts)."""
    out = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in SKIP or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict) -> set:
    """Project modules ``name`` imports anywhere in its body (module level, functions, methods)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".") if package else []
                up = up[: len(up) - (node.level - 1)] if node.level > 1 else up
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]   # 'from pkg import mod' imports pkg.mod
        for t in targets:
            while t and t not in modules:      # 'a.b.c' where c is a function -> module 'a.b'
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(g: dict):
    """A list of modules forming a cycle, or None (iterative DFS, white/grey/black)."""
    state, stack_of = {}, {}
    for root in sorted(g):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(g[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(g.get(nxt, ())))))
                path.append(nxt)
    return None


def test_the_graph_sees_function_level_imports():
    g = graph()
    assert {"common", "modules", "engine", "seg_segmentation", "main_task_align"} <= set(g)
    # main_seg_zeroshot imports modules.checkpoint inside load_model(): the walk must see it
    assert "modules.checkpoint" in g["main_seg_zeroshot"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_common_is_the_bottom_layer():
    """common/ (errors, files, downloads, the CLI layer) imports no other package of the project; the download
    client knows no model; the model imports no training, data or evaluation code."""
    g = graph()
    for name, deps in g.items():
        if name.startswith("common"):
            assert all(d.startswith("common") for d in deps), (name, deps)
        if name.startswith("modules"):
            assert not any(d.split(".")[0] in ("engine", "dataloaders", "seg_segmentation", "preprocess", "demo")
                           for d in deps), (name, deps)
