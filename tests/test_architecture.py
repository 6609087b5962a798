"""The house rules of the code, checked on the source: sizes, imports, layers.

- No module over 500 lines, no function over 60 (argparse builders included), in the library and the apps.
- No private name (leading underscore) imported from another module.
- The library's import graph has no cycle, counting what importing a package's __init__ pulls in, and its
  ground floor (errors, files, progress, device) imports nothing of the package; the one downloader
  (download.py), which data/ and pretrained/ share, stands on that floor only.
- The apps and the CLI use the public surface: `from igpt_core import NAME` with NAME in `__all__`, or
  the modules it exports whole (render, explain, analysis).
"""

import ast
from pathlib import Path

import igpt_core

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "igpt_core"
GROUND_FLOOR = ("errors", "files", "progress", "device")
ON_THE_GROUND_FLOOR = ("download",)  # modules that import the ground floor and nothing else
PUBLIC_MODULES = ("render", "explain", "analysis")


def _sources(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, tree: ast.Module) -> set[str]:
    """igpt_core modules imported by the module at `path` when it loads (top level only), as dotted names,
    including `from . import name` where name is a submodule."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            for alias in node.names:
                if (LIBRARY.parent / (target.replace(".", "/") + f"/{alias.name}.py")).exists() or \
                        (LIBRARY.parent / target.replace(".", "/") / alias.name / "__init__.py").exists():
                    found.add(f"{target}.{alias.name}")
    return found


def test_no_module_over_500_lines_and_no_function_over_60():
    too_long = []
    for path in _sources("igpt_core", "apps"):
        source = path.read_text()
        if len(source.splitlines()) > 500:
            too_long.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in _sources("igpt_core", "apps", "benchmarks", "tests", "scripts"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("igpt")):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, "\n".join(found)


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in _sources("igpt_core"):
        name = _module_name(path)
        edges = _imported_modules(path, ast.parse(path.read_text()))
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}  # already loading
        graph[name] = {parent for edge in edges for parent in
                       (".".join(edge.split(".")[:i]) for i in range(2, edge.count(".") + 2))} - own_packages
    return graph


def test_library_imports_have_no_cycle():
    graph, done, stack = _graph(), set(), []
    graph["igpt_core"] = set()  # the top-level __init__ imports everything; nothing inside imports it

    def visit(module):
        assert module not in stack, "import cycle: " + " -> ".join([*stack[stack.index(module):], module])
        if module in done:
            return
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            if other != "igpt_core":
                visit(other)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        if module != "igpt_core":
            visit(module)


def test_ground_floor_imports_nothing_of_the_package():
    graph = _graph()
    for leaf in GROUND_FLOOR:
        assert graph[f"igpt_core.{leaf}"] <= {"igpt_core"}, (leaf, graph[f"igpt_core.{leaf}"])


def test_shared_helpers_import_only_the_ground_floor():
    graph = _graph()
    floor = {"igpt_core", *(f"igpt_core.{leaf}" for leaf in GROUND_FLOOR)}
    for module in ON_THE_GROUND_FLOOR:
        assert graph[f"igpt_core.{module}"] <= floor, (module, graph[f"igpt_core.{module}"] - floor)


def test_apps_and_cli_use_the_public_surface():
    wrong = []
    for path in [*_sources("apps"), *sorted((LIBRARY / "cli").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("igpt_core"):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if node.module == "igpt_core":
                wrong += [f"{where} {a.name} is not in igpt_core.__all__" for a in node.names
                          if a.name not in igpt_core.__all__]
            elif node.module.removeprefix("igpt_core.") not in PUBLIC_MODULES and not node.module.startswith("igpt_core.cli"):
                wrong.append(f"{where} imports from {node.module}")
    assert not wrong, "\n".join(wrong)
