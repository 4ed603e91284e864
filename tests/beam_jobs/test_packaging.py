"""Dataflow packaging: what workers install from setup.py or the worker image, and the options the job hands to
DataflowRunner.

Nothing is submitted and no image is built: the sdist is built the way Beam's stager builds it for
``--setup_file``, turned into a wheel the way a worker's ``pip install`` does, and inspected; the worker image's
requirements are those its Dockerfile installs, resolved through the installed distributions' metadata.
"""

from __future__ import annotations

import email
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from beam_jobs import preprocess, runner
from tests.beam_jobs.test_dataflow import DATAFLOW as DATAFLOW_ARGS

REPO = Path(runner.PROJECT_SETUP_FILE).parent
# What the job's workers import: the job module and every module it reaches at run time (DoFn.setup included).
WORKER_ENTRY_MODULES = [
    "beam_jobs.preprocess",
    "beam_jobs.volume_to_sample",
    "beam_jobs.dicom",
    "beam_jobs.config",
    "beam_jobs.manifest",
    "beam_jobs.runner",
    "beam_jobs.reshard",
    "beam_jobs.reshard_files",
    "shards",
]
# Base requirements no import shows: pydicom loads its JPEG 2000 / JPEG decoder plugins when it first decodes, and
# fsspec imports gcsfs at the first gs:// URL.
LOADED_ON_USE = {"pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "gcsfs"}
DOCKERFILE = REPO / "dataflow" / "Dockerfile"
# Provided by the Dataflow Python SDK container itself (apache-beam[gcp] and what it depends on).
CONTAINER_DISTRIBUTIONS = {"apache-beam", "numpy", "google-cloud-storage", "python-dateutil", "protobuf"}


@pytest.fixture(scope="module")
def worker_imports() -> dict:
    """Import the worker modules in a fresh interpreter; report our modules' files and third-party top-levels."""
    code = f"""
import importlib, json, sys
for name in {WORKER_ENTRY_MODULES!r}:
    importlib.import_module(name)
ours = sorted(m.__file__ for n, m in sys.modules.items()
              if n.split('.')[0] in ('beam_jobs', 'shards') and getattr(m, '__file__', None))
tops = sorted({{n.split('.')[0] for n, m in sys.modules.items() if getattr(m, '__file__', None)}})
print(json.dumps({{"ours": ours, "tops": tops, "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """sdist built by Beam's own stager code path from a copy of the repository, then a wheel built from it."""
    from apache_beam.runners.portability.stager import Stager

    src = tmp_path_factory.mktemp("src") / "octjepa"
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "build", "dist", "tests", "benchmarks", "*.tar", "data", "runs"
    )
    shutil.copytree(REPO, src, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    sdist = Stager._build_setup_package(str(src / "setup.py"), str(dist))
    wheel_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheel_dir),
            sdist,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(zf.read(meta_name))
    return {
        "sdist": sdist,
        "names": names,
        "requires": metadata.get_all("Requires-Dist") or [],
        "requires_python": metadata.get("Requires-Python", ""),
    }


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_wheel_carries_every_module_the_workers_import(built: dict, worker_imports: dict):
    imports = worker_imports
    assert not imports["torch"], "the Beam worker modules must not import torch"
    for path in imports["ours"]:
        rel = Path(path).resolve().relative_to(REPO).as_posix()
        assert rel in built["names"], f"{rel} is imported by workers but missing from the wheel"
    assert "beam_jobs/preprocess.py" in built["names"] and "shards/contract.py" in built["names"]


def test_worker_install_requires_no_torch(built: dict):
    base = [r for r in built["requires"] if "extra ==" not in r]
    beam = [r for r in built["requires"] if 'extra == "beam"' in r]
    assert base, "the package should declare its base requirements"
    for spec in base + beam:
        assert _requirement_name(spec) not in ("torch", "torch-xla", "torchvision"), spec


def _worker_distributions(worker_imports: dict) -> set[str]:
    """Distributions of the top-level modules the worker modules import."""
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    return {d.lower().replace("_", "-") for top in worker_imports["tops"] for d in dists.get(top, [])}


def test_worker_third_party_imports_are_installed_by_the_sdist(built: dict, worker_imports: dict):
    """Dataflow workers run ``pip install workflow.tar.gz`` with no extras, so every third-party package the worker
    modules import must come from the base requirements or the SDK container."""
    base = {_requirement_name(r) for r in built["requires"] if "extra ==" not in r}
    ours_or_container = base | CONTAINER_DISTRIBUTIONS | {"octjepa"}
    # Only the packages our code imports directly matter; Beam's own imports come with the container.
    direct = {"pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "scipy", "fsspec", "gcsfs", "pyyaml", "numpy"}
    missing = sorted((_worker_distributions(worker_imports) & direct) - ours_or_container)
    assert not missing, f"workers import {missing}, which setup.py's install_requires does not provide"
    assert LOADED_ON_USE <= base, f"{sorted(LOADED_ON_USE - base)} missing from install_requires"


def test_base_requirements_are_only_what_workers_use(built: dict, worker_imports: dict):
    """Every base requirement is imported by the preprocess / reshard workers or loaded by them on use; the
    trainer's own packages (torch, webdataset) belong to the train extra."""
    base = {_requirement_name(r) for r in built["requires"] if "extra ==" not in r}
    unused = sorted(base - _worker_distributions(worker_imports) - LOADED_ON_USE)
    assert not unused, f"install_requires holds {unused}, which no worker imports (move them to an extra)"
    train = {_requirement_name(r) for r in built["requires"] if 'extra == "train"' in r}
    assert {"webdataset", "torch"} <= train


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the worker image's Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _closure(names: set[str]) -> set[str]:
    """``names`` and everything they require (markers evaluated here, no extras), from installed metadata."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            specs = requires(name) or []
        except PackageNotFoundError:
            continue
        for spec in specs:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def test_worker_image_is_the_pinned_beam_sdk_plus_the_base_requirements(built: dict, worker_imports: dict):
    """The Dockerfile starts FROM the Beam SDK image of the pinned Beam on a supported Python and installs this
    package without extras; the image's requirements (the package's base requirements and theirs) hold no torch."""
    from packaging.specifiers import SpecifierSet

    instructions = _dockerfile_instructions()
    (base_image,) = [args for op, args in instructions if op == "FROM"]
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", base_image)
    assert match, f"FROM {base_image}: expected the Beam Python SDK image apache/beam_pythonX.Y_sdk:VERSION"
    python, beam = match.groups()
    (beam_pin,) = [r for r in built["requires"] if _requirement_name(r) == "apache-beam"]
    assert f"=={beam}" in beam_pin, f"image Beam {beam} is not the pinned {beam_pin}"
    assert SpecifierSet(built["requires_python"]).contains(f"{python}.0"), (
        f"image Python {python} is outside the package's python_requires {built['requires_python']}"
    )

    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert installs, "the Dockerfile installs nothing"
    targets = [
        t for args in installs for t in args.split("pip install", 1)[1].split("&&")[0].split() if not t.startswith("-")
    ]
    assert targets == ["."], f"expected the package alone, no extras or other packages: {targets}"
    copied = {src.rstrip("/") for op, args in instructions if op == "COPY" for src in args.split()[:-1]}
    ours = {Path(path).resolve().relative_to(REPO).parts[0] for path in worker_imports["ours"]}
    assert {"setup.py"} | ours <= copied, f"the image must copy {sorted({'setup.py'} | ours - copied)}"
    assert ("ENV", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false") in instructions

    base = {_requirement_name(r) for r in built["requires"] if "extra ==" not in r}
    image = _closure(base)
    assert base <= image and "scipy" in image and "pydicom" in image
    for heavy in ("torch", "torch-xla", "torchvision", "webdataset", "wandb"):
        assert heavy not in image, f"{heavy} would be installed in the worker image"


def test_dataflow_options_as_documented():
    args, beam_args = preprocess.build_parser().parse_known_args(
        ["--manifest", "gs://b/m.tsv", "--data-root", "gs://b", "--output", "gs://b/out", *DATAFLOW_ARGS]
    )
    assert args.output == "gs://b/out" and "--runner" in beam_args
    options = runner.pipeline_options(beam_args, job_name="octjepa-preprocess")
    all_options = options.get_all_options()
    assert not runner.is_local(options)
    assert all_options["setup_file"] == str(REPO / "setup.py")
    assert all_options["save_main_session"] is True
    assert re.fullmatch(r"octjepa-preprocess-\d{8}-\d{6}-[0-9a-f]{6}", all_options["job_name"])
    assert all_options["project"] == "demo-project" and all_options["temp_location"] == "gs://demo-bucket/tmp"
    assert runner.make_runner(options) is None  # Beam resolves DataflowRunner by name
    # A user's own setup file is kept.
    own = runner.pipeline_options([*DATAFLOW_ARGS, "--setup_file", "/elsewhere/setup.py"])
    assert own.get_all_options()["setup_file"] == "/elsewhere/setup.py"
    with pytest.raises(runner.RunnerConfigError, match="--setup_file"):
        runner.pipeline_options(DATAFLOW_ARGS, setup_file="/no/such/setup.py")


def test_local_options_use_the_fn_api_runner_on_every_core():
    options = runner.pipeline_options([])
    direct = options.get_all_options()
    assert runner.is_local(options)
    assert direct["direct_running_mode"] == "multi_processing"
    assert direct["direct_num_workers"] >= 1
    assert type(runner.make_runner(options)).__name__ == "FnApiRunner"
    assert runner.pipeline_options(["--direct_num_workers", "1"]).get_all_options()["direct_num_workers"] == 1


def test_pipeline_graph_serialises_without_submitting():
    """Every DoFn of the job pickles into a runner-API proto, as submission to Dataflow does. (The graph is built
    under default options: constructing a Pipeline with DataflowRunner options validates them against GCS.)"""
    import apache_beam as beam

    opts, _ = preprocess.parse_options(
        ["--manifest", "gs://b/m.tsv", "--data-root", "gs://b", "--output", "gs://b/out", "--samples-per-shard", "4"]
    )
    pipeline = beam.Pipeline(options=runner.pipeline_options(["--direct_num_workers", "1"]))
    preprocess.build_pipeline(pipeline, opts, recommended={"1001": "test"})
    proto = pipeline.to_runner_api()
    labels = {t.unique_name for t in proto.components.transforms.values()}
    for step in (
        "ReadManifest",
        "Preprocess/Reshuffle",
        "Preprocess/DecodeResample",
        "Preprocess/WriteShards",
        "Finalise",
    ):
        assert step in labels, f"step {step} missing from {sorted(labels)[:20]}..."
    roundtrip = beam.Pipeline.from_runner_api(proto, beam.runners.DirectRunner(), pipeline._options)
    assert roundtrip is not None
