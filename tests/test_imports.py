"""The package's import graph, function-level imports included: no module is part of a circle, and each stage
imports only the layers below its own (.importlinter, checked by import-linter). In process, fast."""
import os

import grimp
from importlinter.cli import lint_imports

from conftest import REPO


def circles(graph):
    """The groups of modules that import each other round a circle (strongly connected, more than one)."""
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_round_a_circle():
    graph = grimp.build_graph("hvd_infer", include_external_packages=False)
    assert len(graph.modules) > 30
    assert circles(graph) == []


def test_the_check_finds_a_circle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert circles(graph) == [["p.a", "p.b"]]


def test_the_layers_contract_is_kept():
    assert lint_imports(config_filename=os.path.join(REPO, ".importlinter"), no_cache=True) == 0
