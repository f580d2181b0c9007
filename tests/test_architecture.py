"""The package's shape: no import circle among thinklab's modules, and light modules stay light.

The import graph is read from the source with `ast`, not by importing anything. Every
`import` statement counts, including those inside functions: a lazy import defers the
cost of a dependency but not the dependency itself, and a circle closed by a lazy import
still breaks the day someone moves the import to the top (or the modules import in
another order). Imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = LIB / "thinklab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in `tree`, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The thinklab modules an import statement in `module` loads by name."""
    out = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                out.add(alias.name)
        return out
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in known:
            out.add(sub)  # `from pkg import submodule`
        elif source in known:
            out.add(source)  # `from module import name`
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the thinklab modules it imports (anywhere in its body)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps: set[str] = set()
        for node in _import_nodes(tree):
            deps |= _targets(node, name, path.name == "__init__.py", known)
        deps.discard(name)
        graph[name] = deps
    return graph


def test_the_graph_reader_sees_the_kinds_of_import_it_claims_to():
    graph = import_graph()
    # module level, `from pkg import submodule`
    assert "thinklab.models.disk" in graph["thinklab.models.registry"]
    # function-local
    assert "thinklab.models.moefy" in graph["thinklab.models.registry"]
    # `from pkg import name`: an edge to the package itself
    assert "thinklab.models" in graph["thinklab.backends.hf"]
    # under TYPE_CHECKING: not an edge (moefy names the registry's types only for annotations)
    assert "thinklab.models.registry" not in graph["thinklab.models.moefy"]


def test_no_import_circle_among_thinklab_modules():
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle among thinklab modules: {' -> '.join(exc.args[1])}")
    assert set(order) == set(graph)


def test_models_package_layers():
    """Who may import whom inside thinklab.models: the registry is at the top (it builds
    models through disk, gguf and moefy), router knows nothing else of the package."""
    graph = import_graph()
    inside = {m: {d for d in deps if d.startswith("thinklab.models")}
              for m, deps in graph.items() if m.startswith("thinklab.models.")}
    assert inside["thinklab.models.router"] == set()
    assert inside["thinklab.models.quantization"] == set()
    assert inside["thinklab.models.disk"] == set()
    assert inside["thinklab.models.gguf"] == {"thinklab.models.disk"}
    assert inside["thinklab.models.moefy"] == {"thinklab.models.router"}
    assert "thinklab.models" not in set().union(*inside.values())  # no submodule reaches back into __init__


def _loaded_heavy_modules(code: str) -> list[str]:
    probe = (f"import json, sys\n{code}\n"
             "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["thinklab.studies.moe", "thinklab.studies.quantization",
                                    "thinklab.studies.temperature", "thinklab.studies.overthinking",
                                    "thinklab.models", "thinklab.findings", "thinklab.cli"])
def test_importing_loads_neither_torch_nor_transformers(module):
    assert _loaded_heavy_modules(f"import {module}") == []


def test_naming_models_loads_neither_torch_nor_transformers():
    code = ("from thinklab import models\n"
            "models.list_models()\n"
            "assert models.canonical_name('default') == 'smollm2-135m'\n"
            "assert models.DEFAULT_OFFLINE in models.OFFLINE")
    assert _loaded_heavy_modules(code) == []


def test_router_names_are_reexported_and_load_torch_only_when_used():
    code = "from thinklab import models\nassert callable(models.restore_top_k)"
    assert _loaded_heavy_modules(code) == ["torch"]
