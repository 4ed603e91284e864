"""Submitting to Dataflow: what is refused before any job is built, job names, the custom container, and gcsfs's
bucket-type probe turned off on the launching machine and the workers. Nothing is ever submitted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

import octjepa_cli
from beam_jobs import preprocess, reshard, runner

REPO = Path(runner.PROJECT_SETUP_FILE).parent
DATAFLOW = [
    "--runner",
    "DataflowRunner",
    "--project",
    "demo-project",
    "--region",
    "us-central1",
    "--temp_location",
    "gs://demo-bucket/tmp",
]
REMOTE = {"--manifest": "gs://b/retinal_oct/manifest.tsv", "--data-root": "gs://b", "--output": "gs://b/shards"}
# Dataflow's rule for job names: lowercase letter first, then letters, digits and hyphens, no hyphen at the end.
JOB_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _preprocess_args(dataflow: list[str], **paths: str) -> list[str]:
    merged = {**REMOTE, **{f"--{k.replace('_', '-')}": v for k, v in paths.items()}}
    return [arg for flag, value in merged.items() for arg in (flag, value)] + dataflow


def _without(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


@pytest.mark.parametrize(
    "dataflow, paths, named",
    [
        (_without(DATAFLOW, "--project"), {}, "--project"),
        (_without(DATAFLOW, "--region"), {}, "--region"),
        (_without(DATAFLOW, "--temp_location"), {}, "--temp_location"),
        (DATAFLOW, {"manifest": "data/retinal_oct/manifest.tsv"}, "--manifest"),
        (DATAFLOW, {"data_root": "data"}, "--data-root"),
        (DATAFLOW, {"output": "shards"}, "--output"),
        ([*_without(DATAFLOW, "--temp_location"), "--temp_location", "/tmp/beam"], {}, "--temp_location"),
    ],
)
def test_preprocess_refuses_before_building_a_dataflow_job(dataflow, paths, named, monkeypatch):
    monkeypatch.setattr(runner, "make_pipeline", lambda options: pytest.fail("a pipeline was built"))
    with pytest.raises(runner.RunnerConfigError, match=re.escape(named)) as caught:
        preprocess.run(_preprocess_args(dataflow, **paths))
    assert "\n" not in str(caught.value)


def test_a_local_output_is_refused_as_one_line_and_left_untouched(tmp_path, capsys):
    """Through the dispatcher: exit code 2, one line naming the option, and the existing complete output (its
    index.json) is not retracted by a run that cannot start."""
    output = tmp_path / "shards"
    output.mkdir()
    (output / "index.json").write_text("{}")
    code = octjepa_cli.main(["preprocess", *_preprocess_args(DATAFLOW, output=str(output))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("octjepa preprocess: --output ") and "gs://" in err[0]
    assert (output / "index.json").read_text() == "{}"


def test_reshard_refuses_a_local_input_for_dataflow(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "make_pipeline", lambda options: pytest.fail("a pipeline was built"))
    with pytest.raises(runner.RunnerConfigError, match="--input"):
        reshard.run(["--input", str(tmp_path), "--output", "gs://b/by_device", *DATAFLOW])


def test_a_bucket_that_cannot_be_read_is_refused_and_readable_ones_pass(gcs):
    """On the emulator: a bucket that does not exist cannot be listed; the fixture's bucket can."""
    missing = f"gs://missing-{uuid.uuid4().hex[:8]}"
    options = runner.pipeline_options([*_without(DATAFLOW, "--temp_location"), "--temp_location", f"{gcs}/tmp"])
    with pytest.raises(runner.RunnerConfigError, match=f"--data-root: {missing} cannot be read") as caught:
        runner.check_dataflow(options, manifest=f"{gcs}/m.tsv", data_root=missing, output=f"{gcs}/out")
    assert "\n" not in str(caught.value)
    assert runner.check_dataflow(options, manifest=f"{gcs}/m.tsv", data_root=gcs, output=f"{gcs}/out") is None


def test_local_runs_are_not_checked(tmp_path):
    assert runner.check_dataflow(runner.pipeline_options([]), output=str(tmp_path)) is None


def test_job_names_are_unique_per_run():
    names = [
        runner.pipeline_options(DATAFLOW, job_name="octjepa-preprocess").get_all_options()["job_name"] for _ in range(2)
    ]
    assert names[0] != names[1]
    for name in names:
        assert name.startswith("octjepa-preprocess-") and JOB_NAME.fullmatch(name), name
    stamped = runner.unique_job_name("octjepa-reshard", datetime(2026, 11, 25, 6, 7, 8, tzinfo=timezone.utc))
    assert stamped.startswith("octjepa-reshard-20261125-060708-") and JOB_NAME.fullmatch(stamped)
    # A name the user chose is kept as it is.
    own = runner.pipeline_options([*DATAFLOW, "--job_name", "mine"], job_name="octjepa-preprocess")
    assert own.get_all_options()["job_name"] == "mine"


def test_a_custom_container_replaces_the_setup_file():
    image = "us-central1-docker.pkg.dev/demo-project/octjepa/octjepa-worker:1"
    options = runner.pipeline_options([*DATAFLOW, "--sdk_container_image", image]).get_all_options()
    assert options["sdk_container_image"] == image and options["setup_file"] is None
    assert runner.pipeline_options(DATAFLOW).get_all_options()["setup_file"] == str(REPO / "setup.py")


_FILESYSTEM_CLASS = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
import fsspec
cls = fsspec.get_filesystem_class("gs")
print(json.dumps([cls.__module__, cls.__name__]))
"""


def _gs_filesystem_class(module: str, **env: str) -> list[str]:
    """The class fsspec resolves gs:// to in a fresh interpreter that first imports ``module``."""
    environ = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", _FILESYSTEM_CLASS, module],
        env={**environ, **env},
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["beam_jobs.preprocess", "beam_jobs.reshard", "shards"])
def test_gcsfs_bucket_type_probe_is_off_on_driver_and_workers(module):
    """The launcher and the workers (which import the job modules to run their DoFns) get gcsfs's plain
    filesystem, not the extended one that probes every bucket through the Storage Control API."""
    assert _gs_filesystem_class(module) == ["gcsfs.core", "GCSFileSystem"]
