"""Every row accounted for, whatever its file does: unreadable files and failing decoders are dead-lettered with a
reason, one file gives one sample, a file that contradicts its row is reported, and messages are deterministic.

One run (in-process runner, so that a decoder failure can be injected by monkeypatching) over a small synthetic
dataset plus rows built here; the bad-input corpus of ``synth.bad_inputs`` is exercised elsewhere.
"""

from __future__ import annotations

import posixpath
import random
import shutil
from pathlib import Path
from typing import Any

import fsspec.implementations.local
import pydicom
import pytest
from gcsfs.retry import HttpError

from beam_jobs import dead_letters as dl
from beam_jobs import manifest as mf
from beam_jobs import preprocess, volume_to_sample
from synth.dataset import generate_dataset
from tests.beam_jobs.test_preprocess import TINY, check_nothing_lost, manifest_uids, read_errors, read_samples

IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
_uids = iter(f"1.2.826.0.1.3680043.8.498.77{n:04d}" for n in range(10_000))


def append_rows(manifest: str, rows: list[dict[str, str]]) -> list[int]:
    """Append rows (heading fields -> values) to a manifest; returns their 1-based row numbers."""
    lines = Path(manifest).read_text().rstrip("\n").split("\n")
    heading = lines[0].split("\t")
    first = len(lines)
    lines += ["\t".join(row.get(h, "") for h in heading) for row in rows]
    Path(manifest).write_text("\n".join(lines) + "\n")
    return list(range(first, first + len(rows)))


def manifest_rows(manifest: str) -> list[dict[str, str]]:
    lines = Path(manifest).read_text().rstrip("\n").split("\n")
    heading = lines[0].split("\t")
    return [dict(zip(heading, line.split("\t"))) for line in lines[1:]]


def rewrite_dicom(root: str, source: str, target: str, **elements: str) -> None:
    """Copy a DICOM of the dataset to ``target`` (both relative to ``root``) with some elements changed."""
    ds = pydicom.dcmread(Path(root, source.lstrip("/")))
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    ds.save_as(Path(root, target.lstrip("/")), enforce_file_format=True)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("edge"))
    dataset = generate_dataset(root, participants=2, scale=0.1, seed=21)
    manifest = dataset["manifest"]
    first, second = manifest_rows(manifest)[:2]  # Spectralis macula scans of participant 1001: good files
    good, folder = first["filepath"], posixpath.dirname(first["filepath"])
    participants = Path(root, "participants_with_1003.tsv")
    participants.write_text(
        Path(dataset["participants_tsv"]).read_text().rstrip("\n") + "\n1003\tUCSD\thealthy\t60\tval\tTRUE\n"
    )

    def row(name: str, filepath: str, uid: str | None = None, **fields: str) -> dict[str, str]:
        return {**first, "filepath": filepath, "sop_instance_uid": uid or next(_uids), **fields, "_name": name}

    for name in ("denied", "os_error_in_decoder", "memory_error_in_decoder", "resampler_fails"):
        shutil.copyfile(Path(root, good.lstrip("/")), Path(root, folder.lstrip("/"), f"{name}.dcm"))
    shutil.copyfile(Path(root, good.lstrip("/")), Path(root, folder.lstrip("/"), "copy_of_row_1.dcm"))
    file_uid, row_uid, patient_uid = next(_uids), next(_uids), next(_uids)
    rewrite_dicom(root, good, f"{folder}/other_uid.dcm", SOPInstanceUID=file_uid)
    rewrite_dicom(
        root, second["filepath"], f"{folder}/other_patient.dcm", SOPInstanceUID=patient_uid, PatientID="P-9999"
    )
    added = [
        row("directory", folder),
        row("not_a_directory", f"{good}/inner.dcm"),
        row("denied", f"{folder}/denied.dcm"),
        row("os_error_in_decoder", f"{folder}/os_error_in_decoder.dcm"),
        row("memory_error_in_decoder", f"{folder}/memory_error_in_decoder.dcm"),
        row("resampler_fails", f"{folder}/resampler_fails.dcm"),
        # The file of row 1 again, spelled differently, under another participant (in another split).
        row("dot_path", good.replace("/structural_oct/", "/./structural_oct/"), participant_id="1003"),
        row("double_slash_path", good.replace("/structural_oct/", "//structural_oct/"), participant_id="1003"),
        row("same_file_other_path", f"{folder}/copy_of_row_1.dcm"),
        row("file_says_other_uid", f"{folder}/other_uid.dcm", uid=row_uid),
        row("file_says_other_patient", f"{folder}/other_patient.dcm", uid=patient_uid),
    ]
    numbers = dict(zip((r.pop("_name") for r in added), append_rows(manifest, added)))

    real_cat, real_read, real_resample = (
        fsspec.implementations.local.LocalFileSystem.cat_file,
        volume_to_sample.read_oct_dicom,
        volume_to_sample.resample_to_grid,
    )
    reading: list[str] = []

    def cat_file(self: Any, path: str, *args: Any, **kwargs: Any) -> bytes:
        if path.endswith("/denied.dcm"):
            raise PermissionError(13, "Permission denied", path)
        return real_cat(self, path, *args, **kwargs)

    def read(data: bytes, *, name: str, **kwargs: Any) -> Any:
        reading[:] = [name]
        if name.endswith("os_error_in_decoder.dcm"):
            raise OSError(5, "Input/output error")
        if name.endswith("memory_error_in_decoder.dcm"):
            raise MemoryError("cannot allocate 4294967296 bytes")
        return real_read(data, name=name, **kwargs)

    def resample(*args: Any, **kwargs: Any) -> Any:
        if reading[0].endswith("resampler_fails.dcm"):
            raise ZeroDivisionError("float division by zero")
        return real_resample(*args, **kwargs)

    output = str(tmp_path_factory.mktemp("out") / "edge")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fsspec.implementations.local.LocalFileSystem, "cat_file", cat_file)
        patch.setattr(volume_to_sample, "read_oct_dicom", read)
        patch.setattr(volume_to_sample, "resample_to_grid", resample)
        report = preprocess.run(
            [
                "--manifest",
                manifest,
                "--data-root",
                root,
                "--output",
                output,
                *TINY,
                "--participants",
                str(participants),
                "--samples-per-shard",
                "4",
                *IN_PROCESS,
            ]
        )
    errors = read_errors(output)
    return {
        "dataset": dataset,
        "output": output,
        "report": report,
        "numbers": numbers,
        "row_uid": row_uid,
        "file_uid": file_uid,
        "errors": {e["row"]: e for e in errors},
    }


@pytest.mark.parametrize(
    "name, reason, exception",
    [
        ("directory", "io_error", "IsADirectoryError"),
        ("not_a_directory", "io_error", "NotADirectoryError"),
        ("denied", "io_error", "PermissionError"),
        ("os_error_in_decoder", "decode_error", "OSError: [Errno 5] Input/output error"),
        ("memory_error_in_decoder", "decode_error", "MemoryError: cannot allocate 4294967296 bytes"),
        ("resampler_fails", "decode_error", "ZeroDivisionError: float division by zero"),
    ],
)
def test_a_row_that_cannot_be_read_or_decoded_is_dead_lettered(edge, name, reason, exception):
    record = edge["errors"][edge["numbers"][name]]
    assert record["reason"] == reason and exception in record["message"], record
    assert record["stage"] == ("read" if reason == "io_error" else "decode")


def test_every_row_is_a_sample_or_an_error(edge):
    samples, errors = check_nothing_lost(edge["output"], manifest_uids(edge["dataset"]["manifest"]))
    index = edge["report"]["index"]
    assert index["selected"] == edge["dataset"]["volumes"] + len(edge["numbers"])
    radial = [e for e in errors if e["reason"] == "non_raster_scan"]  # the dataset's own rejects
    assert sum(len(v) for v in samples.values()) == edge["dataset"]["volumes"] - len(radial) + 1  # + other patient


@pytest.mark.parametrize(
    "name, stage", [("dot_path", "manifest"), ("double_slash_path", "manifest"), ("same_file_other_path", "identity")]
)
def test_one_file_gives_one_sample_and_the_first_row_keeps_it(edge, name, stage):
    record = edge["errors"][edge["numbers"][name]]
    assert record["reason"] == "duplicate_file" and record["stage"] == stage, record
    assert "row 1 " in record["message"] and record["key"]
    first_uid = manifest_rows(edge["dataset"]["manifest"])[0]["sop_instance_uid"]
    kept = [
        meta
        for items in read_samples(edge["output"]).values()
        for _, meta in items
        if meta["source_path"] == manifest_rows(edge["dataset"]["manifest"])[0]["filepath"]
    ]
    assert [meta["sop_instance_uid"] for meta in kept] == [first_uid]
    assert kept[0]["participant_id"] == "1001" and kept[0]["split"] == "train"


def test_a_file_that_is_not_its_rows_image_is_a_manifest_mismatch(edge):
    record = edge["errors"][edge["numbers"]["file_says_other_uid"]]
    assert record["reason"] == "manifest_mismatch", record
    assert edge["file_uid"] in record["message"] and edge["row_uid"] in record["message"]


def test_another_patient_id_is_a_warning_counted_in_the_index(edge):
    number = edge["numbers"]["file_says_other_patient"]
    assert number not in edge["errors"]
    warnings = edge["report"]["index"]["warnings"]
    assert warnings["count"] == 1 and warnings["by_kind"] == {"patient_id_mismatch": 1}
    assert warnings["first"][0]["row"] == number and "'P-9999'" in warnings["first"][0]["message"]
    assert "1 warnings" in preprocess.summary(edge["report"])


def test_the_job_itself_counts_no_worker_processes(edge):
    """Which worker took which volume is the tests' business (tests/beam_jobs/worker_evidence.py), not the job's."""
    counters = edge["report"]["counters"]
    assert counters["decoded"] > 0
    assert [name for name in counters if name.startswith("worker_pid_") or "torch" in name] == []


def _decoded(row_number: int, file_uid: str, manifest_uid: str | None = None) -> dl.Decoded:
    row = mf.Row(
        row_number=row_number,
        participant_id="1001",
        device="topcon_triton",
        laterality="L",
        anatomic_region="macula",
        sop_instance_uid=manifest_uid or file_uid,
        filepath=f"/r/{row_number}.dcm",
        split="train",
    )
    return dl.Decoded(row, "1001")


def test_the_first_row_in_manifest_order_wins_whatever_order_the_workers_finished_in():
    rows = [_decoded(7, "1.2.3", "1.2.7"), _decoded(3, "1.2.3"), _decoded(12, "1.2.3", "1.2.12")]
    for _ in range(5):
        random.shuffle(rows)
        kept, errors, warnings = dl.one_sample_per_file("1.2.3", rows)
        assert kept.row.row_number == 3 and warnings == []
        assert [(e["row"], e["reason"]) for e in errors] == [(7, "duplicate_file"), (12, "duplicate_file")]
        assert all("row 3 (/r/3.dcm)" in e["message"] for e in errors)
    kept, errors, _ = dl.one_sample_per_file("1.2.3", [_decoded(4, "1.2.3", "1.2.4"), _decoded(9, "1.2.3")])
    assert kept is None and sorted((e["row"], e["reason"]) for e in errors) == [
        (4, "manifest_mismatch"),
        (9, "duplicate_file"),
    ]


def test_storage_errors_are_told_apart_from_file_errors():
    assert dl.read_failure_reason(FileNotFoundError("gone")) == "missing_file"
    for exc in (
        IsADirectoryError(21, "Is a directory"),
        PermissionError(13, "Permission denied"),
        NotADirectoryError(20, "Not a directory"),
        OSError("Forbidden: b/x.dcm"),
        HttpError({"code": 400, "message": "bad request"}),
    ):
        assert dl.read_failure_reason(exc) == "io_error", exc
    for exc in (HttpError({"code": 503, "message": "backend error"}), HttpError({"code": 429, "message": "slow"})):
        assert dl.read_failure_reason(exc) == "storage_unavailable", exc


def test_messages_carry_no_memory_address():
    row = _decoded(5, "1.2.5").row
    exc = RuntimeError("pillow: cannot identify image file <_io.BytesIO object at 0x7f3290fde570>")
    record = dl.error_record(row, stage="decode", reason="decode_error", message=dl.exception_message(exc))
    assert record["message"] == "RuntimeError: pillow: cannot identify image file <_io.BytesIO object>"
