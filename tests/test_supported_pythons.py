"""The package installs on Python 3.10-3.12 (the TPU VM images ship 3.10) and its TPU extra carries what the Pallas
kernel needs: checked on the built metadata, and on the source (3.10 grammar, no 3.11+-only standard library)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "beam_jobs", "model", "trainer", "benchmarks", "tests")
# Standard-library names that appeared in 3.11 or later.
NEWER_APIS = re.compile(
    r"\b(tomllib|typing\.Self|from typing import[^\n]*\bSelf\b|ExceptionGroup|except\*|"
    r"datetime\.UTC|from datetime import[^\n]*\bUTC\b|StrEnum|asyncio\.TaskGroup|"
    r"typing\.(?:LiteralString|Never|assert_never|reveal_type|Required|NotRequired))"
)


def _metadata(tmp_path: Path) -> dict[str, list[str]]:
    """The wheel metadata setup.py produces (PEP 517 prepare_metadata), as {field: [values]}."""
    code = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    text = (tmp_path / out.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ": " in line:
            key, value = line.split(": ", 1)
            fields.setdefault(key, []).append(value)
    return fields


def test_requires_python_admits_3_10_to_3_12_and_the_tpu_extra_carries_pallas(tmp_path: Path) -> None:
    meta = _metadata(tmp_path)
    (requires,) = meta["Requires-Python"]
    spec = SpecifierSet(requires)
    assert all(v in spec for v in ("3.10.12", "3.11.7", "3.12.3")) and "3.13.0" not in spec, requires
    tpu = [Requirement(r) for r in meta["Requires-Dist"] if 'extra == "tpu"' in r]
    xla = [r for r in tpu if r.name == "torch_xla"]
    assert xla and {"tpu", "pallas"} <= xla[0].extras, tpu


def test_the_launcher_installs_the_torch_setup_py_pins(tmp_path: Path) -> None:
    from trainer import launch_tpu

    meta = _metadata(tmp_path)
    (torch_req,) = [r for r in meta["Requires-Dist"] if r.startswith("torch==") and 'extra == "train"' in r]
    assert Requirement(torch_req).specifier == Requirement(launch_tpu.TORCH_CPU).specifier


def test_every_module_parses_as_python_3_10_and_uses_no_newer_library() -> None:
    files = [REPO / "setup.py", REPO / "octjepa_cli.py"] + [p for d in PACKAGES for p in (REPO / d).rglob("*.py")]
    assert len(files) > 50
    for path in files:
        source = path.read_text()
        ast.parse(source, filename=str(path), feature_version=(3, 10))  # SyntaxError on 3.11+ grammar
        if path.name != Path(__file__).name:
            match = NEWER_APIS.search(source)
            assert match is None, f"{path.relative_to(REPO)} uses {match.group(0)!r}, not in Python 3.10"
