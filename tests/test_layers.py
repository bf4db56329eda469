"""The import layering of harness/ (its docstring): no import runs back up, and no circle."""

import ast
from pathlib import Path

import harness

ROOT = Path(harness.__file__).parent
LAYERS = [
    ["errors", "interrupts"],
    ["progress", "claims", "memory", "models"],
    ["quant"],
    ["data"],
    ["evaluate", "stats"],
    ["schema", "config", "tracking", "estimate"],
    ["train"],
    ["runner", "inspect", "pretrain", "bench"],
    ["executor", "search", "kernels"],
    ["report", "search_report"],
    ["cli", "gpu_check", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """harness module (relative name) -> the harness modules it imports, anywhere in its body."""
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(["harness", *package.split(".")][: len(package.split(".")) + 2 - node.level])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                rel = name.removeprefix("harness.")
                if name.startswith("harness.") and rel in mods and rel != mod and rel != package:
                    found.add(rel)
        graph[mod] = found
    return graph


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    assert top in LAYER, f"harness/{mod.replace('.', '/')}: not in any layer of harness/__init__.py"
    return LAYER[top]


def test_no_import_runs_up():
    upward = [
        f"{a} (layer {_layer(a) + 1}) -> {b} (layer {_layer(b) + 1})"
        for a, targets in imports().items()
        if a
        for b in targets
        if _layer(b) > _layer(a)
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_circle():
    graph = imports()
    seen, circles = {}, []

    def walk(mod, stack):
        seen[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            if seen.get(dep) == "open":
                circles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in seen:
                walk(dep, [*stack, dep])
        seen[mod] = "done"

    for mod in sorted(graph):
        if mod not in seen:
            walk(mod, [mod])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_walk_sees_function_level_imports():
    graph = imports()
    # harness/cli.py imports most commands inside their functions; train's dataset comes from the registry
    assert {"report", "search", "runner"} <= graph["cli"]
    assert "evaluate.registry" in graph["train"] and "runner" not in graph["train"]
