"""Issue 22: the parent/worker boundary and the import graph, kept as they are by tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "harness"
# what only a worker runs: the measuring code, the backends, and the frameworks they import
WORKER_SIDE = ("harness.measure", "harness.throughput", "harness.quality", "harness.trackers", "harness.finetune",
               "harness.backends", "torch", "transformers", "tensorflow", "jax")  # fmt: skip
PARENT_SIDE = ("harness.cli", "harness.runner", "harness.launcher", "harness.plugin", "harness.preflight",
               "harness.matrix", "harness.shard", "harness.report", "harness.memplan", "harness.trainplan")  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """harness module -> the harness modules it imports anywhere in its text (in functions too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` depends on the submodule, not on the package's body
                submodules = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if t in modules else node.module for t in submodules]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by depth-first search (empty when the graph has none)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(graph):
        if state[start] == 0:
            visit(start, [start])
    return found


def test_the_import_graph_has_no_cycle_even_through_imports_inside_functions() -> None:
    graph = import_graph()
    assert {"harness.runner", "harness.measure", "harness.zoo", "harness.zoo_training"} <= graph.keys()
    assert "harness.repeats" in graph["harness.runner"]  # the walk sees the edges (a broken walk finds none)
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # and would find one


def test_the_parent_side_imports_no_measuring_code() -> None:
    """Importing what runs in the parent (CLI, runner, launcher, plugin, plans, report) loads neither the
    measuring modules nor a framework: those are the worker's."""
    code = (
        "import sys\n"
        f"for name in {PARENT_SIDE!r}: __import__(name)\n"
        f"print(sorted({{m for m in sys.modules for w in {WORKER_SIDE!r} if m == w or m.startswith(w + '.')}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
