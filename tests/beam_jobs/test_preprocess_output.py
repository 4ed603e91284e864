"""A good set is never replaced by mistake: inputs are checked before --output is touched, a complete set needs
--overwrite, a run in which every row fails is an error that leaves the earlier set whole, one job per output (the
lease), and a killed driver takes its local worker processes with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import octjepa_cli
from beam_jobs import preprocess, runner
from beam_jobs.job import FAILED_RUN_ERRORS
from beam_jobs.preprocess_output import AllRowsFailed
from shards import lease, read_index
from synth.dataset import generate_dataset
from tests.beam_jobs.test_preprocess import TINY, files_under

IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def argv(dataset: dict[str, Any], output: str, *extra: str, **paths: str) -> list[str]:
    """preprocess arguments; ``paths`` replace --manifest / --data_root / --participants."""
    given = {
        "manifest": dataset["manifest"],
        "data_root": dataset["root"],
        "participants": dataset["participants_tsv"],
        **paths,
    }
    flags = [part for name, value in given.items() for part in (f"--{name.replace('_', '-')}", value)]
    return [*flags, "--output", output, *TINY, "--samples-per-shard", "3", *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return generate_dataset(str(tmp_path_factory.mktemp("aireadi")), participants=2, scale=0.1, seed=4)


@pytest.fixture(scope="module")
def complete(dataset: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = str(tmp_path_factory.mktemp("complete") / "set")
    preprocess.run(argv(dataset, output, *IN_PROCESS))
    return {"output": output, "files": files_under(output)}


def one_line_error(capsys: pytest.CaptureFixture, args: list[str], code: int) -> str:
    assert octjepa_cli.main(args) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def no_pipeline(*_: Any) -> Any:
    raise AssertionError("a pipeline was built although the inputs are wrong")


@pytest.mark.parametrize(
    "paths, extra, message",
    [
        ({"data_root": "/nowhere"}, (), "--data-root /nowhere: not a readable folder"),
        ({"data_root": "MANIFEST"}, (), "not a readable folder"),  # a file, not a folder
        ({"manifest": "/nowhere/manifest.tsv"}, (), "/nowhere/manifest.tsv: file not found"),
        ({"manifest": "ROOT"}, (), "cannot be read (IsADirectoryError"),  # a folder, not a file
        ({"participants": "/nowhere/participants.tsv"}, (), "/nowhere/participants.tsv: file not found"),
        ({"participants": "MANIFEST"}, (), "no 'recommended_split' column"),
        ({}, ("--anatomic-regions", "elbow"), "none of its N rows is selected"),
    ],
)
def test_wrong_inputs_are_one_line_errors_and_never_touch_a_good_set(
    complete, dataset, monkeypatch, capsys, paths, extra, message
):
    monkeypatch.setattr(runner, "make_pipeline", no_pipeline)
    paths = {k: {"MANIFEST": dataset["manifest"], "ROOT": dataset["root"]}.get(v, v) for k, v in paths.items()}
    err = one_line_error(capsys, ["preprocess", *argv(dataset, complete["output"], "--overwrite", *extra, **paths)], 2)
    assert message.replace(" N ", f" {dataset['volumes']} ") in err, err
    assert files_under(complete["output"]) == complete["files"]


def test_a_complete_set_is_replaced_only_with_overwrite(complete, dataset, monkeypatch, capsys):
    monkeypatch.setattr(runner, "make_pipeline", no_pipeline)
    err = one_line_error(capsys, ["preprocess", *argv(dataset, complete["output"], *IN_PROCESS)], 2)
    assert "already holds a complete set" in err and "--overwrite" in err
    assert files_under(complete["output"]) == complete["files"]


def test_a_run_in_which_every_row_fails_is_an_error_and_leaves_the_earlier_set(complete, dataset, tmp_path, capsys):
    empty_root = tmp_path / "empty_root"  # readable, but holds none of the manifest's files
    empty_root.mkdir()
    err = one_line_error(
        capsys,
        ["preprocess", *argv(dataset, complete["output"], "--overwrite", *IN_PROCESS, data_root=str(empty_root))],
        1,
    )
    n = dataset["volumes"]
    assert f"every one of the {n} selected rows failed ({{'missing_file': {n}}})" in err, err
    assert "the set already there is unchanged" in err
    after = files_under(complete["output"])
    failed = after.pop(FAILED_RUN_ERRORS)
    assert after == complete["files"]
    assert failed.count(b'"reason": "missing_file"') == n

    fresh = str(tmp_path / "fresh")  # whatever was in --output: an empty one too
    with pytest.raises(AllRowsFailed, match="no set was written"):
        preprocess.run(argv(dataset, fresh, *IN_PROCESS, data_root=str(empty_root)))
    assert not Path(fresh, "index.json").exists()

    # The next run that writes a set removes the failed run's dead letters.
    preprocess.run(argv(dataset, fresh, *IN_PROCESS))
    assert not Path(fresh, FAILED_RUN_ERRORS).exists() and read_index(fresh)["selected"] == n


def test_a_second_job_into_a_leased_output_is_refused(complete, dataset, tmp_path, capsys):
    output = str(tmp_path / "leased")
    with lease.hold(output, job="preprocess"):
        err = one_line_error(capsys, ["preprocess", *argv(dataset, output, *IN_PROCESS)], 1)
        assert f"{output} is being written by octjepa preprocess on" in err, err
        err = one_line_error(capsys, ["reshard", "--input", complete["output"], "--output", output, *IN_PROCESS], 1)
        assert "is being written by octjepa preprocess" in err, err
    assert os.listdir(output) == []  # nothing written, and the lease is gone with its holder


# ---------------------------------------------------------------------------------------------- killing the driver
def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of a session, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            found.append(int(entry))
    return found


# Loaded by every Python process of the job (driver and workers) from PYTHONPATH: each volume takes a second, so
# that the workers are surely busy when the driver is killed.
SLOW_VOLUMES = """
import time
import beam_jobs.volume_to_sample as volume_to_sample

_read = volume_to_sample.read_oct_dicom


def _slow_read(*args, **kwargs):
    time.sleep(1.0)
    return _read(*args, **kwargs)


volume_to_sample.read_oct_dicom = _slow_read
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_the_driver_stops_its_workers_and_frees_the_output(dataset, tmp_path, capsys, signum):
    output, patches = tmp_path / "out", tmp_path / "patches"
    patches.mkdir()
    (patches / "sitecustomize.py").write_text(SLOW_VOLUMES)
    repo = Path(preprocess.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(patches), str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.preprocess", *argv(dataset, str(output), "--direct_num_workers", "2")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(output.glob("_staging/*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        assert len(session_processes(proc.pid)) >= 3, "expected the driver and two workers"
        err = one_line_error(capsys, ["preprocess", *argv(dataset, str(output), *IN_PROCESS)], 1)
        assert "is being written by octjepa preprocess" in err  # one job per output, while it lives

        os.kill(proc.pid, signum)
        time.sleep(0.5)
        files = files_under(str(output))  # what the job had written half a second after the signal
        assert proc.wait(timeout=60) == -signum, "the driver went on instead of ending at the signal"
        time.sleep(1.0)
        assert session_processes(proc.pid) == [], "worker processes outlived their driver"
        assert files_under(str(output)) == files, "files were still written after the signal"
        assert "index.json" not in files
        lease.acquire(str(output), job="test").release()  # a dead run leaves no lease behind
    finally:
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--samples-per-shard", "0"), "--samples-per-shard must be >= 1"),
        (("--val-fraction", "1.5"), "--val-fraction must be in [0, 1)"),
    ],
)
def test_bad_options_are_one_line_errors(dataset, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(runner, "make_pipeline", no_pipeline)
    assert message in one_line_error(capsys, ["preprocess", *argv(dataset, str(tmp_path / "out"), *extra)], 2)
    assert not (tmp_path / "out").exists()
