"""The package's shape, read from its source with `ast`: layers that import only downward, no import cycle between
modules or folders, no private name imported across modules, no hidden in-function imports of the package, a module
map that lists every module, few top-level modules, tests that mirror the folders, and files of a readable size."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "safety_units"
MAX_LINES = 420  # "files under ~400 lines" (DEVELOPERS.md)
# The layering rule of the package docstring, lowest first: a folder imports only from its own folder and from
# folders of a lower rank. experiments and runs share the top rank and do not import each other.
LAYERS = ["utils", "units", "models", "data", "attribution", "steering", "evaluation", "defenses", "training",
          ("experiments", "runs")]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in ((layer,) if isinstance(layer, str) else layer)}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a subpackage is its __init__)."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(node, module: str, known: set[str]) -> set[str]:
    """The package modules an import statement loads (`from a.b import c` loads a, a.b and a.b.c if c is one)."""
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: not used in this package, but resolved all the same
            base = ".".join(module.split(".")[: len(module.split(".")) - node.level] + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
        names = [a.name for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return out - {module}


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int]]]:
    """(module -> modules it imports at load time, [(module, line)] of package imports inside functions)."""
    mods = modules()
    known = set(mods)
    graph, inner = {}, []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            deps = imported(node, name, known)
            if node in tree.body:
                graph[name] |= deps
            elif deps:
                inner.append((name, node.lineno))
    return graph, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    graph, _ = import_graph()
    assert len(graph) > 40 and "safety_units.experiments.study.runner" in graph
    assert graph["safety_units.evaluation.suite"] >= {"safety_units.evaluation.multiple_choice", "safety_units.evaluation.rejudge"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_in_function_imports_of_the_package_say_why():
    """Allowed only to keep a heavy optional import (matplotlib, torch for a torch-free judge) out of a module's
    import, with the reason in a comment on the import line."""
    _, inner = import_graph()
    silent = []
    for module, line in inner:
        text = modules()[module].read_text().splitlines()[line - 1]
        if "#" not in text:
            silent.append(f"{module}:{line}: {text.strip()}")
    assert not silent, "in-function imports without a reason:\n" + "\n".join(silent)


def folder(module: str) -> str | None:
    """The top-level folder of a package module (`safety_units.units.masking` -> `units`); None for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def all_imports() -> list[tuple[str, str, int]]:
    """(module, imported package module, line) for every import of the package, at load time or in a function."""
    mods = modules()
    out = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out += [(name, dep, node.lineno) for dep in imported(node, name, set(mods))]
    return out


def upward(imports: list[tuple[str, str, int]]) -> list[str]:
    """The imports that break the layering rule: into another folder that is not of a lower rank."""
    bad = []
    for module, dep, line in imports:
        a, b = folder(module), folder(dep)
        if a and b and a != b and RANK[b] >= RANK[a]:
            bad.append(f"{module}:{line} imports {dep} ({a} may not import {b})")
    return bad


def test_the_layering_rule_catches_an_upward_import():
    assert upward([("safety_units.units.masking", "safety_units.training.fit", 3)])
    assert upward([("safety_units.runs", "safety_units.experiments.study", 1)])  # same rank, different folders
    assert not upward([("safety_units.training.fit", "safety_units.units.masking", 3),
                       ("safety_units.units.masking", "safety_units.units.groups", 1)])


def test_every_folder_has_a_layer_and_imports_only_downward():
    folders = {folder(m) for m in modules()} - {None}
    assert folders == set(RANK), f"folders without a layer (or layers without a folder): {folders ^ set(RANK)}"
    bad = upward(all_imports())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_cycle_between_folders():
    graph: dict[str, set[str]] = {f: set() for f in RANK}
    for module, dep, _ in all_imports():
        if folder(module) and folder(dep) and folder(module) != folder(dep):
            graph[folder(module)].add(folder(dep))
    assert find_cycle(graph) is None, f"folder cycle: {' -> '.join(find_cycle(graph))}"


def test_no_private_name_is_imported_across_modules():
    mods = modules()
    private = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safety_units"):
                private += [f"{name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_the_package_top_level_holds_folders_not_modules():
    top = [p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())]
    assert len(top) <= 12, f"{len(top)} top-level modules and folders: {sorted(top)}"
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]


def test_tests_mirror_the_folders():
    """Each test file sits in tests/<folder>/ (or tests/ itself for the cross-cutting configs and structure tests),
    and every package module is imported by at least one test."""
    tests = ROOT / "tests"
    folders = set(RANK)
    for f in tests.rglob("test_*.py"):
        rel = f.relative_to(tests).parts
        assert len(rel) == 1 or rel[0] in folders | {"gpu"}, f"{f}: tests/<folder> of the package, please"
    imported_by_tests = set()
    known = set(modules())
    for f in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported_by_tests |= imported(node, "tests", known)
    untested = sorted(m for m in known - imported_by_tests
                      if not m.endswith("__main__") and not (modules()[m].name == "__init__.py"
                                                                 and len(modules()[m].read_text().splitlines()) < 5))
    assert not untested, f"modules no test imports: {untested}"


def test_the_module_map_lists_every_module():
    """The package docstring's map (indented lines after `Modules`, module name first) names each module once."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()), clean=False)
    section = doc.split("\nModules", 1)[1]
    listed = [line.split()[0] for line in section.splitlines() if line.startswith("    ") and line.strip()]
    actual = sorted(m.split(".", 1)[1] for m in modules() if m != "safety_units")
    assert sorted(listed) == actual


def test_modules_stay_readable_in_size():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_command_line_main_in_library_modules():
    """Command lines live in scripts/, the entry points and `__main__` modules; the package holds what they call."""
    mains = [m for m, p in modules().items() if not m.endswith(".__main__")
             and any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)]
    assert not mains, f"main() in library modules: {mains}"
