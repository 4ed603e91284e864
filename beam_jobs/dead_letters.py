"""The preprocessing job's dead letters: one ``errors.jsonl`` line per manifest row that did not become a sample,
and the warnings counted in ``index.json``. Plain functions, no Beam.

Reasons besides ``beam_jobs.dicom.REASONS`` (what the DICOM reader rejects):

- ``malformed_row``: a manifest row that cannot be read (``beam_jobs.manifest``).
- ``missing_file``: the row's file does not exist.
- ``io_error``: the file exists but cannot be read: a directory, a path through a file, permission denied, any
  other ``OSError``, or a storage error that retrying cannot fix (gcsfs's non-retriable HTTP errors).
- ``storage_unavailable``: a transient storage error (gcsfs's retriable ones: HTTP 408/429/5xx, connection resets,
  timeouts, checksum mismatches) that gcsfs already retried with backoff (``shards.storage``) without success. The
  job does not retry again (Beam would retry the bundle, then fail the whole job); a re-run picks the file up.
- ``decode_error``: any other exception the decoder, the resampler or the encoder raised for this file (memory
  errors included), with its class and message.
- ``duplicate_file``: the file was already taken by an earlier row (same normalised path, or the same
  SOPInstanceUID inside the file); the message names that row.
- ``manifest_mismatch``: the file's own SOPInstanceUID differs from the row's ``sop_instance_uid``.

Messages are deterministic: the same input gives the same ``errors.jsonl`` bytes on every run (object reprs such
as ``<_io.BytesIO object at 0x7f...>`` from a decoder plugin lose their address).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from beam_jobs import manifest as mf
from shards import make_key

WARNINGS_KEPT = 100  # warning records kept in index.json (all are counted)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def deterministic(message: str) -> str:
    """``message`` without the memory addresses that object reprs carry."""
    return _ADDRESS.sub("", message)


def exception_message(exc: BaseException) -> str:
    """``<class>: <message>`` of an exception, as one deterministic string."""
    text = str(exc)
    return deterministic(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def read_failure_reason(exc: BaseException) -> str:
    """The reason of a failure to read a row's file (see the module docstring for the split)."""
    if isinstance(exc, FileNotFoundError):
        return "missing_file"
    if _is_transient(exc):
        return "storage_unavailable"
    return "io_error"


def _is_transient(exc: BaseException) -> bool:
    try:
        from gcsfs.retry import is_retriable
    except ImportError:  # a worker without gcsfs reads local files only
        return False
    return bool(is_retriable(exc))


def error_record(row: mf.Row, *, stage: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "key": make_key(row.device, row.participant_id, row.sop_instance_uid),
        "row": row.row_number,
        "filepath": row.filepath,
        "sop_instance_uid": row.sop_instance_uid,
        "stage": stage,
        "reason": reason,
        "message": deterministic(message),
    }


def warning_record(row: mf.Row, *, kind: str, message: str) -> dict[str, Any]:
    return {
        "key": make_key(row.device, row.participant_id, row.sop_instance_uid),
        "row": row.row_number,
        "kind": kind,
        "message": deterministic(message),
    }


def sort_key(record: Mapping[str, Any]) -> tuple[int, str]:
    return (record["row"] if record.get("row") is not None else -1, record.get("key") or "")


def count_by(records: Iterable[Mapping[str, Any]], field: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[record[field]] = counts.get(record[field], 0) + 1
    return dict(sorted(counts.items()))


def warnings_summary(warnings: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """index["warnings"]: every warning counted by kind, the first WARNINGS_KEPT (in row order) kept whole."""
    ordered = sorted(warnings, key=sort_key)
    return {"count": len(ordered), "by_kind": count_by(ordered, "kind"), "first": ordered[:WARNINGS_KEPT]}


@dataclass(frozen=True)
class Decoded:
    """A row whose sample is staged (keyed by its file's own SOPInstanceUID), and the file's PatientID."""

    row: mf.Row
    patient_id: str


def one_sample_per_file(file_uid: str, decoded: Iterable[Decoded]) -> tuple[Decoded | None, list[dict], list[dict]]:
    """The rows whose files hold one SOPInstanceUID -> (the row kept, error records, warning records).

    The first row in manifest order takes the file, whatever order the workers finished in; it is kept when the
    file's UID is the row's (else ``manifest_mismatch``); every later row is a ``duplicate_file`` naming it.
    """
    first, *others = sorted(decoded, key=lambda d: d.row.row_number)
    errors = [
        error_record(
            d.row,
            stage="identity",
            reason="duplicate_file",
            message=(
                f"{d.row.filepath}: holds the same DICOM as row {first.row.row_number} ({first.row.filepath}): "
                f"SOPInstanceUID {file_uid} in both files; one file, one sample: row {first.row.row_number} takes it"
            ),
        )
        for d in others
    ]
    if first.row.sop_instance_uid != file_uid:
        errors.append(
            error_record(
                first.row,
                stage="identity",
                reason="manifest_mismatch",
                message=(
                    f"{first.row.filepath}: the file's SOPInstanceUID is {file_uid}, "
                    f"the manifest row's sop_instance_uid is {first.row.sop_instance_uid}"
                ),
            )
        )
        return None, errors, []
    warnings = []
    if first.patient_id and first.patient_id != first.row.participant_id:
        warnings.append(
            warning_record(
                first.row,
                kind="patient_id_mismatch",
                message=(
                    f"{first.row.filepath}: the file's PatientID is {first.patient_id!r}, "
                    f"the manifest row's participant is {first.row.participant_id!r}"
                ),
            )
        )
    return first, errors, warnings
