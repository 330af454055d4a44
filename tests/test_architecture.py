"""The package's layers import downward only, without cycles (docs/architecture.md).

Read from the source with ``ast``, so a new upward import or cycle fails here before anyone
notices it at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slim2deploy"
# lowest first: a module may import its own layer and the layers before it, never a later one
LAYERS = ["base", "model", "prune", "deploy", "runtime", "measure", "pipeline", "cli"]
# the command line imports the pipeline when a command runs, so `--help` never imports torch
LAZY_OWN_IMPORTS_ALLOWED = {"cli"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# below the command line, messages name parameters (`width`), not flags (--width): the CLI translates them
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
FLAG_ALLOWED = {
    "slim2deploy.base.environment": {"--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"}
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _own_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the package's own modules."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            checking = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            for name in names:
                # `from slim2deploy.measure import benchmark` imports slim2deploy.measure.benchmark
                if name in MODULES and name != "slim2deploy" and not checking:
                    found.append((name, child.lineno, inner))
            visit(child, inner, checking)

    visit(tree, False, False)
    return found


GRAPH = {m: _own_imports(p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_imports_point_down_the_layers(module):
    here = LAYERS.index(_layer(module))
    upward = [
        f"line {line}: {name}" for name, line, _ in GRAPH[module] if _layer(name) and LAYERS.index(_layer(name)) > here
    ]
    assert not upward, f"{module} ({LAYERS[here]}) imports a later layer: {upward}"


def test_own_modules_are_imported_at_the_top_of_a_module():
    offenders = [
        f"{module}:{line} imports {name} inside a function"
        for module, imports in GRAPH.items()
        for name, line, in_function in imports
        if in_function and _layer(module) not in LAZY_OWN_IMPORTS_ALLOWED and module != "slim2deploy"
    ]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    edges = {m: {n for n, _, _ in imports if n != m and n in MODULES} for m, imports in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                cycle = walk(n)
                if cycle:
                    return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = walk(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The rules above must be able to fail: a planted upward import is found by _own_imports."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from slim2deploy.pipeline.build import build\n")
    assert _own_imports(bad) == [("slim2deploy.pipeline.build", 2, True)]


def test_modules_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


TESTS = Path(__file__).resolve().parent


def _test_module_imports(path: Path) -> list[str]:
    """``line N: module`` for each import of conftest or of a test module in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] == "conftest" or n.startswith("test_")]
    return found


def test_no_test_module_imports_another_or_conftest():
    """What test modules share is in tests/helpers.py (functions) or conftest.py (fixtures, found by pytest)."""
    offenders = {p.name: found for p in sorted(TESTS.glob("*.py")) if (found := _test_module_imports(p))}
    assert not offenders, offenders


def test_the_test_import_check_sees_an_import_inside_a_function(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("import os\n\ndef test_x():\n    from test_runners import SAMPLE\n    import conftest\n")
    assert _test_module_imports(planted) == ["line 4: test_runners", "line 5: conftest"]


def test_nothing_edits_the_import_path():
    """bench/ scripts import the installed package; an edited ``sys.path`` would let them run another copy."""
    roots = [PACKAGE, PACKAGE.parent / "bench"]
    edits = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys"
    ]
    assert not edits, f"sys.path used at {edits}"


def test_functions_stay_short():
    long = [
        f"{m}.{node.name} ({node.end_lineno - node.lineno + 1})"
        for m, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _flag_literals(path: Path) -> list[tuple[int, str]]:
    """``--flag`` spellings in the string literals of ``path`` that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        (node.lineno, flag)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
        for flag in FLAG.findall(node.value)
    ]


def test_lower_layers_name_parameters_not_flags():
    found = [
        f"{m}:{line} {flag}"
        for m, path in MODULES.items()
        if not m.startswith("slim2deploy.cli")
        for line, flag in _flag_literals(path)
        if not any(flag in allowed for allowed in FLAG_ALLOWED.get(m, ()))
    ]
    assert not found, f"flag spellings below the command line (name the parameter in backquotes): {found}"


def test_the_flag_checker_sees_a_flag_in_a_message_and_not_in_a_docstring(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text('"""Use --width."""\n\ndef f():\n    """--lr too."""\n    raise ValueError(f"pass --lr {1}")\n')
    assert _flag_literals(bad) == [(5, "--lr")]
