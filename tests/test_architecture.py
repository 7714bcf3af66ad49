"""The house rules that a reader of the code relies on, checked on the source (no process is started):

- no import circle between the package's modules (every import of one of our modules counts, at the top of a file
  or inside a function): a circle is two concepts that cannot be read, tested or moved apart;
- nothing under losses/ or methods/ reads megatron's global parallel_state: losses take their process groups and
  methods their LossContext (methods/base.py) from the trainer;
- the step's two engines supply only what differs: no engine module imports the other.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_tsdkd")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[_module_name(path)] = path
    return found


def _imports(path: str, name: str, modules: dict) -> set[str]:
    """The package modules ``name`` imports (absolute or relative, anywhere in the file); ``from pkg import mod``
    counts as importing pkg.mod."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("megatron_tsdkd"):
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(start):
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
                continue
            if child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_finder_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert len(graph) > 100, "the walk found too few modules"
    assert "megatron_tsdkd.engines.trainer" in graph["megatron_tsdkd.engines.job"]   # the walk sees imports
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_losses_and_methods_read_no_global_parallel_state():
    offenders = []
    for folder in ("losses", "methods"):
        for name in sorted(os.listdir(os.path.join(PACKAGE, folder))):
            if name.endswith(".py") and "parallel_state" in open(os.path.join(PACKAGE, folder, name)).read():
                offenders.append(f"{folder}/{name}")
    assert not offenders, f"parallel_state read in {offenders}: pass groups explicitly (LossContext)"


def test_engines_do_not_import_each_other():
    graph = import_graph()
    for engine, other in (("megatron", "deepspeed"), ("deepspeed", "megatron")):
        for name, targets in graph.items():
            if name.startswith(f"megatron_tsdkd.engines.{engine}"):
                assert not any(t.startswith(f"megatron_tsdkd.engines.{other}") for t in targets), (name, targets)
