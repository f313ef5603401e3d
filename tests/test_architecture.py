"""The package's shape, read from its source: imports go down the layers docs/architecture.md
lists (and every module is listed there), no import circle, no function over 60 lines, and
comments and docstrings at most 15% of the lines."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "cifar_ray"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """Dotted name (without `cifar_ray.`) -> file, for every module but the packages' empty
    __init__ files."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if path.name == "__init__.py":
            assert not path.read_text().strip(), f"{path}: a package's __init__ stays empty"
            continue
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, at the top or inside a function."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar_ray"):
            base = node.module.removeprefix("cifar_ray").lstrip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}".lstrip(".")
                targets.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            targets |= {a.name.removeprefix("cifar_ray.") for a in node.names
                        if a.name.startswith("cifar_ray.")}
    return targets & known - {name}


def layers() -> list[set[str]]:
    """The table of docs/architecture.md's "Layers", from the bottom one up."""
    rows = re.findall(r"^\| (\d+) \| [^|]+ \| ([^|]+) \|$", ARCHITECTURE.read_text(), re.M)
    assert rows, "docs/architecture.md has no layer table"
    return [set(re.findall(r"`([\w.]+)`", cell)) for _, cell in sorted(rows, key=lambda r: int(r[0]))]


def test_every_module_is_in_one_layer_and_imports_only_its_own_or_lower_ones():
    found = modules()
    table = layers()
    level = {}
    for i, names in enumerate(table):
        for name in names:
            assert name not in level, f"{name} is in two layers"
            level[name] = i
    assert set(level) == set(found), ("docs/architecture.md's layers and the package differ: "
                                      f"{sorted(set(level) ^ set(found))}")
    upward = [f"{name} (layer {level[name]}) imports {target} (layer {level[target]})"
              for name, path in found.items() for target in imports(name, path, set(found))
              if level[target] > level[name]]
    assert not upward, upward


def test_no_import_circle():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    done, path = set(), []

    def visit(name: str) -> None:
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_no_function_is_over_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def comment_lines(source: str) -> tuple[int, int]:
    """(comment and docstring lines, non-blank lines); a line with a trailing comment counts."""
    tree = ast.parse(source)
    marked = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
              if tok.type == tokenize.COMMENT}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and ast.get_docstring(node, clean=False) is not None:
            marked.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    lines = source.splitlines()
    return (sum(1 for i in marked if lines[i - 1].strip()),
            sum(1 for line in lines if line.strip()))


@pytest.mark.parametrize("source, expected", [
    ('"""Doc."""\nx = 1  # why\n\ny = 2\n', (2, 3)),
    ('def f():\n    """Two\n    lines."""\n    # a comment\n    return 1\n', (3, 5)),
])
def test_comment_lines_are_counted_as_the_issue_counts_them(source, expected):
    assert comment_lines(source) == expected


def test_comments_and_docstrings_are_at_most_15_percent_of_the_lines():
    counts = [comment_lines(path.read_text()) for path in modules().values()]
    comments, lines = sum(c for c, _ in counts), sum(n for _, n in counts)
    assert comments <= 0.15 * lines, f"{comments} of {lines} lines ({comments / lines:.1%})"
