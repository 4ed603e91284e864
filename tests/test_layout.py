"""The README's layout, read from the source: who may import whom (statically, from each module's import lines)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("beam_jobs", "shards", "model", "trainer")
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


def test_nothing_outside_tests_imports_tests():
    offenders = {p.relative_to(REPO).as_posix(): sorted(m for m in imported_modules(p) if m.split(".")[0] == "tests")
                 for p in modules_of(*PRODUCTION, "benchmarks")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_builds_on_a_cli_module():
    """What a CLI module shares (the root-index schema, the hashing reader) lives in the contract it checks."""
    offenders = {p.relative_to(REPO).as_posix(): sorted(imported_modules(p) & set(CLI_ONLY))
                 for p in modules_of(*PRODUCTION, "benchmarks")}
    assert {k: v for k, v in offenders.items() if v} == {}


def unused_from_imports(path: Path) -> list[str]:
    """Names a module takes with ``from X import name`` and never uses (a plain ``import x`` may be for its side
    effect): a re-export that only tests read."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module != "__future__" for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {node.value.id for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    return sorted(imported - used)


def test_job_modules_re_export_nothing():
    """Tests import a name from the module it lives in, not through a job module that happens to import it."""
    offenders = {p.relative_to(REPO).as_posix(): unused_from_imports(p)
                 for p in modules_of("beam_jobs", "shards", "benchmarks") if p.name != "__init__.py"}
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
