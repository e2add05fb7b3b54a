"""Issue 22: the parent/worker boundary and the import graph, kept as they are by tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "harness"
# what only a worker runs: the measuring code, the backends, and the frameworks they import
WORKER_SIDE = ("harness.measure", "harness.backends", "torch", "transformers", "tensorflow", "jax")
# what runs in the parent: the CLI and every module of these subpackages (the plans are computed in a worker,
# but import their frameworks only inside functions)
PARENT_PACKAGES = ("harness.plan", "harness.run", "harness.report", "harness.plugin")
# plan/ and run/ import neither measure/ nor backends/, but for these edges, each for its reason:
ALLOWED_CROSSINGS = {
    # the worker process's entry runs the scenarios on a backend; inside functions only (checked below), so
    # the parent importing WorkerJob loads none of it
    "harness.run.worker": ("harness.measure", "harness.backends"),
    # each quantizer family declares the bytes it stores beside its layout (planned_bytes); the plan reads them
    "harness.plan.memplan": ("harness.backends.quantizers",),
}


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
    assert {"harness.run.runner", "harness.measure.inference", "harness.zoo", "harness.zoo.training"} <= graph.keys()
    assert "harness.stats" in graph["harness.run.runner"]  # the walk sees the edges (a broken walk finds none)
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # and would find one


def under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def parent_side() -> list[str]:
    return ["harness.cli", *(m for m in import_graph() if under(m, PARENT_PACKAGES))]


def test_the_parent_side_imports_no_measuring_code() -> None:
    """Importing what runs in the parent (CLI, plan, run, report, plugin) loads neither the measuring
    modules nor a backend nor a framework: those are the worker's."""
    modules = parent_side()
    assert {"harness.run.runner", "harness.plan.preflight", "harness.plugin.fixtures"} <= set(modules)
    code = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        f"print(sorted({{m for m in sys.modules for w in {WORKER_SIDE!r} if m == w or m.startswith(w + '.')}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plan_and_run_import_no_measuring_code_or_backend_but_the_named_crossings() -> None:
    """The contract the tree shows: plan/ and run/ (the parent's side of the boundary) never import
    measure/ or backends/, in functions too, except the edges ALLOWED_CROSSINGS names."""
    graph = import_graph()
    crossings = {
        (module, target)
        for module, targets in graph.items()
        if under(module, ("harness.plan", "harness.run"))
        for target in targets
        if under(target, ("harness.measure", "harness.backends"))
    }
    assert ("harness.run.worker", "harness.measure.inference") in crossings  # the walk sees them
    unexpected = {(m, t) for m, t in crossings if not under(t, ALLOWED_CROSSINGS.get(m, ()))}
    assert unexpected == set()
    worker = ast.parse((PACKAGE / "run" / "worker.py").read_text())
    assert not {t for t in module_level_imports(worker) if under(t, WORKER_SIDE)}


def module_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported when a module is imported: its statements outside function bodies."""
    found: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        stack.extend(ast.iter_child_nodes(node))
    return found
