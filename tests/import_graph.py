"""The project's import graph, read from the source (ast), for the stage-dependency and layering tests.

Every import counts, also those inside functions (they run when the code path does), and so do strings that
name a project module: registry targets ("pipeline.backends.torch_tp:TorchTPBackend") and `python -m` module
names handed to subprocesses ("pipeline.benchmark.worker") load code just as an import does."""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

from tests.conftest import ROOT

MODULE_STRING = re.compile(r"^((?:pipeline|stages)(?:\.\w+)+)(?::\w+)?$")
# The registry's "module:Class" strings load code only when load_backend_class() is called: reading the
# declarations (as config validation does) loads no backend.
REGISTRY = ROOT / "pipeline" / "backends" / "registry.py"
LOADER = "load_backend_class"


def registry_targets() -> set[str]:
    tree = ast.parse(REGISTRY.read_text())
    return {m.group(1) for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            for m in [MODULE_STRING.match(node.value)] if m}


def module_file(name: str) -> Path | None:
    """'pipeline.convert.ft' -> pipeline/convert/ft.py (or the package's __init__.py); None if not ours."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _walk(node):
    """ast.walk, minus `if TYPE_CHECKING:` blocks (type hints only, never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for orelse in child.orelse for n in [orelse, *_walk(orelse)])
            continue
        yield child
        yield from _walk(child)


@lru_cache(maxsize=None)
def direct_imports(path: Path) -> frozenset[Path]:
    """Project files `path` imports (at any depth of its code), by import statement or module string."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and path != REGISTRY:
            m = MODULE_STRING.match(node.value)
            if m:
                names.add(m.group(1))
        elif (isinstance(node, ast.Name) and node.id == LOADER) or (isinstance(node, ast.Attribute)
                                                                     and node.attr == LOADER):
            names.update(registry_targets())
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] not in ("pipeline", "stages"):
            continue
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]))
            if f is not None:
                found.add(f)
    found.discard(path)
    return frozenset(found)


def closure(start: Path, stop: frozenset[Path] = frozenset()) -> set[Path]:
    """Every project file `start` loads, transitively; files in `stop` are included but not followed."""
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if f not in stop:
            todo.extend(direct_imports(f))
    return seen


def project_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "pipeline").rglob("*.py"))


def is_code_free(init: Path) -> bool:
    """An __init__.py holding nothing but a docstring cannot change what a stage produces."""
    body = ast.parse(init.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)
