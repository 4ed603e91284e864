"""The README's layout, read from the source: who may import whom (statically, from each module's import lines)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("beam_jobs", "shards", "model", "trainer", "synth")
# Modules that are a subcommand's command line only: the dispatcher runs them; no other module builds on them.
CLI_ONLY = ("shards.verify",)


def imported_modules(path: Path) -> set[str]:
    """Absolute module names the file imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules_of(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).glob("*.py"))


def module_name(path: Path) -> str:
    package = path.parent.relative_to(REPO).as_posix().replace("/", ".")
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def import_graph(*folders: str) -> dict[str, set[str]]:
    """Module -> the modules of ``folders`` it imports, wherever the import line is (a function body, an
    ``if TYPE_CHECKING:`` block): a package's ``__init__`` is the package's own name."""
    modules = {module_name(p): p for p in modules_of(*folders)}
    return {name: (imported_modules(path) & set(modules)) - {name} for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_beam_jobs_imports_nothing_from_synth():
    """The synthetic data is built on the jobs' definitions (the DICOM SOP class), never the other way round: the
    workers ship without it."""
    offenders = {
        p.relative_to(REPO).as_posix(): sorted(m for m in imported_modules(p) if m.split(".")[0] == "synth")
        for p in modules_of("beam_jobs")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_of_synth_or_beam_jobs_imports_a_module_that_imports_it_back():
    graph = import_graph("beam_jobs", "synth")
    assert sorted(name for name in graph if name in reachable(graph, name)) == []


def test_nothing_outside_tests_imports_tests():
    offenders = {
        p.relative_to(REPO).as_posix(): sorted(m for m in imported_modules(p) if m.split(".")[0] == "tests")
        for p in modules_of(*PRODUCTION, "benchmarks")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_builds_on_a_cli_module():
    """What a CLI module shares (the root-index schema, the hashing reader) lives in the contract it checks."""
    offenders = {
        p.relative_to(REPO).as_posix(): sorted(imported_modules(p) & set(CLI_ONLY))
        for p in modules_of(*PRODUCTION, "benchmarks")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def unused_from_imports(path: Path) -> list[str]:
    """Names a module takes with ``from X import name`` and never uses (a plain ``import x`` may be for its side
    effect): a re-export that only tests read."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    }
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {
        node.value.id for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
    }
    return sorted(imported - used)


def test_job_modules_re_export_nothing():
    """Tests import a name from the module it lives in, not through a job module that happens to import it."""
    offenders = {
        p.relative_to(REPO).as_posix(): unused_from_imports(p)
        for p in modules_of("beam_jobs", "shards", "synth", "benchmarks")
        if p.name != "__init__.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_one_name_per_concept_in_the_data_packages():
    """Two classes of one name in beam_jobs/ and shards/ are two concepts under one name (a job's own steps, its
    ``beam.DoFn``s, may share a name with the other job's counterpart)."""
    where: dict[str, list[str]] = {}
    for path in modules_of("beam_jobs", "shards"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef) and not any(ast.unparse(b) == "beam.DoFn" for b in node.bases):
                where.setdefault(node.name, []).append(path.relative_to(REPO).as_posix())
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
