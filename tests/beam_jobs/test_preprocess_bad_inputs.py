"""Bad input never stops the job: every kind lands in errors.jsonl with its own reason, the rest is sharded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from beam_jobs import preprocess
from synth.dataset import generate_dataset
from tests.beam_jobs.test_preprocess import check_nothing_lost, job_args, manifest_uids, read_errors

# The issue's list of bad inputs -> the reason each must be reported with.
ISSUE_KINDS = {
    "a missing file": "missing_file",
    "a malformed manifest row": "malformed_row",
    "a truncated file": "truncated",
    "a non-DICOM file": "not_dicom",
    "a DICOM with no pixel data": "no_pixel_data",
    "a wrong SOP class": "wrong_sop_class",
    "missing spacing": "missing_spacing",
    "implausible spacing": "implausible_spacing",
    "a corrupt JPEG 2000 codestream": "corrupt_codestream",
    "a header that declares 100000 frames": "too_large",
    "zero frames": "zero_frames",
    "RGB": "not_grayscale",
    "a non-raster scan": "non_raster_scan",
}


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("broken"))
    dataset = generate_dataset(root, participants=2, scale=0.1, seed=11, broken=True)
    output = str(tmp_path_factory.mktemp("out") / "broken")
    report = preprocess.run(job_args(dataset, output, "--samples-per-shard", "4", "--direct_num_workers", "2"))
    return {"dataset": dataset, "output": output, "report": report, "errors": read_errors(output)}


def test_every_bad_input_has_its_own_reason(broken_run: dict[str, Any]):
    expected: dict[str, str] = broken_run["dataset"]["bad_inputs"]
    assert set(expected.values()) == set(ISSUE_KINDS.values()), "the corpus must cover every kind in the issue"
    by_uid = {e["sop_instance_uid"]: e for e in broken_run["errors"] if e["sop_instance_uid"]}
    by_row = {e["row"]: e for e in broken_run["errors"]}
    for ident, reason in expected.items():
        record = by_row[int(ident[4:])] if ident.startswith("row:") else by_uid[ident]
        assert record["reason"] == reason, f"{ident}: expected {reason}, got {record}"
        assert record["message"] and record["stage"] in ("manifest", "read", "decode")
        if reason != "malformed_row":
            assert record["filepath"] in record["message"] and record["key"]


def test_errors_lines_are_complete_and_counted(broken_run: dict[str, Any]):
    errors, index = broken_run["errors"], broken_run["report"]["index"]
    for record in errors:
        assert set(record) == {"key", "row", "filepath", "sop_instance_uid", "stage", "reason", "message"}
    counted: dict[str, int] = {}
    for record in errors:
        counted[record["reason"]] = counted.get(record["reason"], 0) + 1
    assert index["errors"]["by_reason"] == counted
    assert "decode_error" not in counted, [e["message"] for e in errors if e["reason"] == "decode_error"]
    assert [e["row"] for e in errors] == sorted(e["row"] for e in errors)  # deterministic order


def test_good_volumes_still_sharded_and_nothing_lost(broken_run: dict[str, Any]):
    dataset = broken_run["dataset"]
    # The malformed row's UID cannot be read back from a row whose columns are shifted; it is reported by row.
    uids = manifest_uids(dataset["manifest"])
    samples, errors = check_nothing_lost_with_malformed(broken_run["output"], uids)
    good = sum(len(v) for v in samples.values())
    assert good >= dataset["volumes"] - 2 and good > 0


def test_errors_jsonl_is_byte_identical_across_runs(broken_run: dict[str, Any], tmp_path: Path):
    """A second run (its own worker process, so objects live at other addresses) writes the same dead letters."""
    output = str(tmp_path / "again")
    preprocess.run(job_args(broken_run["dataset"], output, "--samples-per-shard", "4", "--direct_num_workers", "1"))
    again, first = Path(output, "errors.jsonl").read_bytes(), Path(broken_run["output"], "errors.jsonl").read_bytes()
    assert again == first and b" at 0x" not in first


def check_nothing_lost_with_malformed(output: str, uids: list[str]):
    errors = read_errors(output)
    malformed = [e for e in errors if e["reason"] == "malformed_row"]
    assert len(malformed) == 1
    # check_nothing_lost counts every error line against a UID; the malformed row's is whatever its fields held.
    return check_nothing_lost(output, uids + [malformed[0]["sop_instance_uid"]])
