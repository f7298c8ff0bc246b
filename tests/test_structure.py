"""The package's shape, read from its source with `ast`: no import cycle between modules, no hidden in-function
imports of the package, a module map that lists every module, and files of a readable size."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "safety_units"
MAX_LINES = 420  # "files under ~400 lines" (DEVELOPERS.md)


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
    assert len(graph) > 40 and "safety_units.study.runner" in graph
    assert graph["safety_units.evaluation"] >= {"safety_units.multiple_choice", "safety_units.rejudge"}
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


def test_the_module_map_lists_every_module():
    """The package docstring's map (indented lines, module name first) names each module once, and no other."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()), clean=False)
    listed = [line.split()[0] for line in doc.splitlines() if line.startswith("    ") and line.strip()]
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
