"""Imports point down: base modules <- model <- parallel <- convert <- runner <- backends <- config <- stage
libraries <- stages, and no two parts of `pipeline` import each other (no cycle, directly or round about).
Read from the source (tests/import_graph.py), so a function-level import counts too."""

from __future__ import annotations

from tests.conftest import ROOT
from tests.import_graph import direct_imports, module_name, project_modules

# Each part of `pipeline` (a sub-package or a top-level module) and its layer; an import may only point to a
# part of the same or a lower layer.
LAYERS = {
    0: ("errors", "precision", "paths", "versions", "artifacts", "progress", "onnx_io", "requirements"),
    1: ("model",),
    2: ("parallel",),
    3: ("convert", "engines"),
    4: ("runner",),
    5: ("backends",),
    6: ("config",),
    7: ("lineage", "compose", "weights", "export", "calibrate", "evaluate", "verify_parallel", "benchmark", "trtllm_bench"),
    8: ("tracking", "report"),
    9: ("__main__", "advise", "doctor", "sweep"),
}
LAYER_OF = {part: layer for layer, parts in LAYERS.items() for part in parts}


def part(path) -> str:
    name = module_name(path).split(".")
    return name[1] if len(name) > 1 else "__init__"


def _edges():
    for f in project_modules():
        for g in direct_imports(f):
            if g.is_relative_to(ROOT / "pipeline") and part(f) != part(g):
                yield f, g


def test_every_part_has_a_layer():
    parts = {part(f) for f in project_modules()} - {"__init__"}
    assert parts <= set(LAYER_OF), f"add these to LAYERS: {sorted(parts - set(LAYER_OF))}"


def test_imports_point_down():
    upward = [f"{f.relative_to(ROOT)} -> {g.relative_to(ROOT)}" for f, g in _edges()
              if LAYER_OF.get(part(g), 0) > LAYER_OF.get(part(f), 0)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for f, g in _edges():
        graph.setdefault(part(f), set()).add(part(g))
    cycles = []

    def visit(node, stack):
        for nxt in graph.get(node, ()):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    done: set[str] = set()
    for node in list(graph):
        if node not in done:
            visit(node, [node])
    assert not cycles, f"import cycles between parts of pipeline: {cycles[:3]}"


def test_parallel_layout_is_a_leaf():
    mapping = ROOT / "pipeline/parallel/mapping.py"
    assert {g.relative_to(ROOT).as_posix() for g in direct_imports(mapping)} <= {"pipeline/errors.py", "pipeline/__init__.py"}
