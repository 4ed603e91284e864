"""What the preprocessing job writes under ``--output`` besides the shards, without Beam: staged samples, the
finalisation (errors.jsonl, stale shards out, index.json last), and the driver's reading of the result.

A run in which every selected row failed writes no shard and no index: its dead letters go to
``O/failed-run-errors.jsonl`` (``beam_jobs.job``; errors.jsonl and index.json belong to whatever set the output
already held, which stays whole) and the driver raises ``AllRowsFailed``. The next run that writes a set removes it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

from beam_jobs import dead_letters as dl
from beam_jobs import job
from shards import INDEX_NAME, complete_set, iter_shard, storage, write_shard
from shards.errors import OctjepaError

CREATED_BY = "beam_jobs.preprocess"
STAGING = "_staging"


class AllRowsFailed(OctjepaError):
    """Every selected row of the run failed: no shard was written; the message counts the reasons."""

    exit_code = 1


def retract_index(output: str) -> None:
    """Delete the output's index.json if it has one; shard writers call it concurrently, so one that finds it
    already gone has nothing to do."""
    fs, path = storage.get_fs(storage.join(output, INDEX_NAME))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def staged_url(output: str, key: str) -> str:
    return storage.join(output, STAGING, f"{key}.tar")


def stage_sample(output: str, sample: Mapping[str, Any]) -> None:
    """Write one encoded sample as a one-sample tar (the shard format itself, so nothing is restated)."""
    buf = io.BytesIO()
    write_shard(buf, [sample])
    storage.write_bytes(staged_url(output, sample["__key__"]), buf.getvalue())


def read_staged(output: str, key: str) -> dict[str, Any]:
    url = staged_url(output, key)
    with storage.open_url(url, "rb") as f:
        samples = list(iter_shard(f, name=url))
    if len(samples) != 1 or samples[0]["__key__"] != key:
        raise RuntimeError(f"{url}: expected the one staged sample {key}, found {[s['__key__'] for s in samples]}")
    return samples[0]


def finalise(
    output: str,
    *,
    entries: Sequence[Mapping[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    warnings: Sequence[Mapping[str, Any]] = (),
    manifest_rows: int,
    selected: int,
    config: Mapping[str, Any],
) -> dict[str, Any] | None:
    """Write errors.jsonl, remove stale shards and write index.json (last); refuse (no index) if inputs went
    missing. When no sample was written, only the dead letters are written (to FAILED_RUN_ERRORS) and None is
    returned: whatever set the output held stays as it was."""
    written = sum(e["num_samples"] for e in entries)
    if written + len(errors) != selected:
        raise RuntimeError(
            f"{output}: {selected} selected manifest rows, but {written} samples in shards + "
            f"{len(errors)} errors; refusing to write {INDEX_NAME}"
        )
    errors = sorted(errors, key=dl.sort_key)
    storage.remove(storage.join(output, STAGING), recursive=True)
    if written == 0:
        job.write_failed_run(output, errors)
        return None
    job.clear_failed_run(output)
    return complete_set(
        output,
        entries,
        errors=job.encode_jsonl(errors),
        config=config,
        errors_by_reason=dl.count_by(errors, "reason"),
        manifest_rows=manifest_rows,
        selected=selected,
        created_by=CREATED_BY,
        extra={"warnings": dl.warnings_summary(warnings)},
    )


def all_rows_failed(output: str, errors: list[dict[str, Any]]) -> AllRowsFailed:
    """The error of a run whose every selected row failed, from its dead letters."""
    earlier = (
        "the set already there is unchanged"
        if storage.exists(storage.join(output, INDEX_NAME))
        else "no set was written"
    )
    first = f"; first: row {errors[0]['row']}: {errors[0]['message']}" if errors else ""
    return AllRowsFailed(
        f"{output}: every one of the {len(errors)} selected rows failed "
        f"({dl.count_by(errors, 'reason')}); no shard was written and {earlier}. Every row's "
        f"reason is in {storage.join(output, job.FAILED_RUN_ERRORS)}{first}"
    )
