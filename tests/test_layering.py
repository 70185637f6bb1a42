"""The package's layers: each folder imports only from folders below it, modules form no import
cycle, and the package's own modules are imported at module level (so the structure is what the
import statements say), except where an optional dependency makes a lazy import necessary."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "resu_tensor"

# Bottom to top. The modules directly in resu_tensor/ (the public facade and its re-exports) sit
# above every layer.
LAYERS = ("kernels", "method", "core", "ops", "training", "parallel", "integrations")
FACADE = len(LAYERS)

# Modules allowed to import the package's own modules inside a function, each for an optional
# dependency that a module-level import would make everyone install.
LAZY_IMPORTS_ALLOWED = {
    "resu_tensor.integrations": "loads integrations.hf, and with it transformers (the [hf] extra), on first use",
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return FACADE


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of the package's modules (or packages) an ``import from`` statement reads."""
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if not prefix.startswith("resu_tensor"):
        return []
    candidates = [f"{prefix}.{alias.name}" for alias in node.names]
    return [c for c in candidates if c in MODULES] or [prefix]


def _is_import_module_call(node: ast.Call) -> bool:
    """``importlib.import_module("resu_tensor...")`` (an import all the same)."""
    func = node.func
    named = isinstance(func, ast.Attribute) and func.attr == "import_module" or \
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    return named and bool(node.args) and isinstance(node.args[0], ast.Constant) and \
        str(node.args[0].value).startswith("resu_tensor")


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(imported module of the package, made inside a function) for every import in ``source``."""
    tree = ast.parse(source)
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Call) and _is_import_module_call(child):
                found.append((child.args[0].value, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("resu_tensor"))
            elif isinstance(child, ast.ImportFrom):
                found.extend((name, in_function) for name in _resolve(module, is_package, child))
            visit(child, nested)

    visit(tree, False)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
# C extension modules (one source file each, named as the module) import nothing of the package
MODULES = {module_name(path) for path in FILES} | {module_name(path) for path in PACKAGE.rglob("*.c")}
IMPORTS = {module_name(path): _imports(path) for path in FILES}


def _module_level_graph() -> dict[str, set[str]]:
    graph = {}
    for module, imports in IMPORTS.items():
        # a module's import also runs its package's __init__; the facade's __init__ imports every layer
        targets = {target for target, lazy in imports if not lazy and target != module}
        graph[module] = {t for t in targets if t in MODULES and t != "resu_tensor"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module → modules it imports), or [] if there is none."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_every_module_belongs_to_a_layer_or_the_facade():
    folders = {p.parent.name for p in FILES if p.parent != PACKAGE}
    assert folders <= set(LAYERS), f"folders outside the layers {LAYERS}: {sorted(folders - set(LAYERS))}"


def test_no_import_cycle():
    graph = _module_level_graph()
    assert "resu_tensor.core.transitions" in graph["resu_tensor.core.tensor"]  # the graph is read at all
    assert find_cycle(graph) == []


def test_no_upward_import():
    upward = [
        f"{module} (layer {LAYERS[layer_of(module)] if layer_of(module) < FACADE else 'facade'}) imports {target}"
        for module, imports in IMPORTS.items()
        for target, _ in imports
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_own_modules_are_imported_at_module_level():
    assert len(LAZY_IMPORTS_ALLOWED) <= 5
    lazy = sorted({(module, target) for module, imports in IMPORTS.items() for target, in_function in imports
                   if in_function})
    unexpected = [pair for pair in lazy if pair[0] not in LAZY_IMPORTS_ALLOWED]
    assert unexpected == []
    assert sorted(set(LAZY_IMPORTS_ALLOWED) - {module for module, _ in lazy}) == [], "allowlist entries not needed"


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_find_cycle_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_upward_and_lazy_imports_are_seen():
    source = ("from resu_tensor.training.scheduler import ResuScheduler\n\ndef f():\n    from .. import ops\n"
              "    importlib.import_module('resu_tensor.parallel.fsdp')\n")
    imports = imports_in(source, "resu_tensor.core.probe", is_package=False)
    assert imports == [("resu_tensor.training.scheduler", False), ("resu_tensor.ops", True),
                       ("resu_tensor.parallel.fsdp", True)]
    assert layer_of("resu_tensor.training.scheduler") > layer_of("resu_tensor.core.probe")
