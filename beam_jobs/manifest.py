"""The AI-READI ``manifest.tsv`` and ``participants.tsv``: which rows the preprocessing job reads, each row's device
domain, and each participant's split. Plain functions, no Beam; the job and the tests call them directly.

A manifest row names one DICOM (``filepath`` relative to the dataset root) with its participant, device, eye and
region. Releases differ in the participant column's heading (``participant_id`` or ``person_id``); both are read.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shards import SPLITS, make_key, stable_hash, storage
from shards.errors import OctjepaError
from shards.typed_config import ConfigError

OCT_IMAGING = "OCT"
DEVICES = ("heidelberg_spectralis", "topcon_maestro2", "topcon_triton", "zeiss_cirrus")
PARTICIPANT_HEADINGS = ("participant_id", "person_id")
REQUIRED = ("imaging", "sop_instance_uid", "filepath")
DEFAULT_VAL_FRACTION = 0.1
# (manufacturer word, model word) -> device domain, for rows whose path does not name a known device folder.
_MODEL_DEVICES = {
    ("heidelberg", "spectralis"): "heidelberg_spectralis",
    ("topcon", "maestro2"): "topcon_maestro2",
    ("topcon", "maestro"): "topcon_maestro2",
    ("topcon", "triton"): "topcon_triton",
    ("zeiss", "cirrus"): "zeiss_cirrus",
    ("carl", "cirrus"): "zeiss_cirrus",
}
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class ManifestError(OctjepaError, ValueError):
    """A manifest or participants file that cannot be read at all (not a single bad row); names the file."""


@dataclass(frozen=True)
class Row:
    """One selected manifest row, in the shape ``dicom_to_sample`` takes (``as_dict``), plus its split."""

    row_number: int  # 1-based data row (the heading is row 0), as reported in errors.jsonl
    participant_id: str
    device: str
    laterality: str
    anatomic_region: str
    sop_instance_uid: str
    filepath: str
    split: str

    def as_dict(self) -> dict[str, str]:
        return {
            "participant_id": self.participant_id,
            "device": self.device,
            "laterality": self.laterality,
            "anatomic_region": self.anatomic_region,
            "sop_instance_uid": self.sop_instance_uid,
            "filepath": self.filepath,
        }

    @property
    def path(self) -> str:
        """The file's path below the data root, normalised: the job reads this, and two rows with the same one
        name the same file."""
        return normalise_path(self.filepath)

    @property
    def key(self) -> str:
        return make_key(self.device, self.participant_id, self.sop_instance_uid)


@dataclass(frozen=True)
class BadRow:
    """A selected manifest row that is not read: it becomes a line in errors.jsonl with ``reason``
    (``malformed_row``, or ``duplicate_file`` for a second row naming an already listed file)."""

    row_number: int
    filepath: str
    sop_instance_uid: str
    message: str
    reason: str = "malformed_row"
    key: str | None = None


@dataclass(frozen=True)
class Selection:
    """Which rows to keep. Empty tuples mean every device / every region."""

    devices: tuple[str, ...] = ()
    anatomic_regions: tuple[str, ...] = ()

    def keeps(self, device: str, region: str) -> bool:
        if self.devices and device not in self.devices:
            return False
        return not self.anatomic_regions or normalise_region(region) in {
            normalise_region(r) for r in self.anatomic_regions
        }


def normalise_region(region: str) -> str:
    """'Optic Disc', 'optic_disc' and 'optic-disc' name the same region."""
    return re.sub(r"[\s_\-]+", "_", region.strip().lower())


def normalise_path(filepath: str) -> str:
    """``a/./b``, ``a//b``, ``/a/b`` and ``a/x/../b`` are one file: ``a/b`` (relative to the data root)."""
    return posixpath.normpath("/" + filepath.strip()).lstrip("/")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")


def device_from_path(filepath: str) -> str | None:
    """The device folder of an AI-READI path (``.../structural_oct/<device>/<participant>/<file>``), if it names
    one of DEVICES."""
    for part in re.split(r"[\\/]+", filepath):
        if part.lower() in DEVICES:
            return part.lower()
    return None


def device_from_model(manufacturer: str, model: str) -> str | None:
    """Device domain from the DICOM manufacturer and model names; an unknown pair gets ``<maker>_<model>``."""
    maker, name = _slug(manufacturer), _slug(model)
    for (m, n), device in _MODEL_DEVICES.items():
        if m in maker.split("_") and n in name.split("_"):
            return device
    if maker and name:
        return f"{maker.split('_')[0]}_{name}"
    return None


def device_domain(filepath: str, manufacturer: str = "", model: str = "") -> str | None:
    return device_from_path(filepath) or device_from_model(manufacturer, model)


def hash_split(participant_id: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """Deterministic train/val split of a participant (same answer in every process and on every run)."""
    return "val" if stable_hash(f"split:{participant_id}") % 10_000 < round(val_fraction * 10_000) else "train"


def assign_split(
    participant_id: str, recommended: Mapping[str, str] | None, val_fraction: float = DEFAULT_VAL_FRACTION
) -> str:
    """``recommended_split`` from participants.tsv when the participant is listed there, else ``hash_split``.
    Either way the split is a function of the participant alone, so no participant spans two splits."""
    if recommended and participant_id in recommended:
        return recommended[participant_id]
    return hash_split(participant_id, val_fraction)


def _read_tsv(url: str, text: str | None = None) -> tuple[list[str], list[list[str]]]:
    if text is None:
        try:
            text = storage.read_bytes(url).decode("utf-8-sig")
        except FileNotFoundError as exc:
            raise ManifestError(f"{url}: file not found") from exc
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{url}: not UTF-8 text ({exc})") from exc
        except OSError as exc:  # a directory, permission denied, ...
            raise ManifestError(f"{url}: cannot be read ({type(exc).__name__}: {exc})") from exc
    lines = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines:
        raise ManifestError(f"{url}: empty file, expected a tab-separated heading row")
    heading = [h.strip().lower() for h in lines[0]]
    return heading, lines[1:]


def _participant_column(url: str, heading: Sequence[str]) -> str:
    for name in PARTICIPANT_HEADINGS:
        if name in heading:
            return name
    raise ManifestError(f"{url}: no participant column; expected one of {PARTICIPANT_HEADINGS}, found {list(heading)}")


def read_participants(url: str, text: str | None = None) -> dict[str, str]:
    """participants.tsv -> {participant_id: split} from its ``recommended_split`` column."""
    heading, lines = _read_tsv(url, text)
    pid_col = _participant_column(url, heading)
    if "recommended_split" not in heading:
        raise ManifestError(f"{url}: no 'recommended_split' column (columns: {heading})")
    out: dict[str, str] = {}
    for n, values in enumerate(lines, start=1):
        if not any(v.strip() for v in values):
            continue
        record = dict(zip(heading, (v.strip() for v in values)))
        pid, raw = record.get(pid_col, ""), record.get("recommended_split", "")
        split = _SPLIT_ALIASES.get(raw.lower())
        if not pid or split is None or split not in SPLITS:
            raise ManifestError(
                f"{url}: row {n}: expected a participant id and a recommended_split in "
                f"{sorted(_SPLIT_ALIASES)}, found {pid_col}={pid!r} recommended_split={raw!r}"
            )
        if out.get(pid, split) != split:
            raise ManifestError(f"{url}: participant {pid} is listed in two splits ({out[pid]!r} and {split!r})")
        out[pid] = split
    return out


def parse_manifest(
    url: str,
    *,
    selection: Selection = Selection(),
    recommended: Mapping[str, str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    text: str | None = None,
) -> tuple[int, list[Row | BadRow]]:
    """(number of data rows, the selected rows): ``imaging == OCT`` rows of the selected devices and regions, each
    a ``Row`` or, when it cannot be read, a ``BadRow``. A structurally broken row (wrong column count, empty
    required field, no derivable device) is reported rather than dropped, because it cannot be shown not to be
    selected. One file, one sample: a row naming the normalised path of an earlier row is a ``duplicate_file``."""
    heading, lines = _read_tsv(url, text)
    pid_col = _participant_column(url, heading)
    missing = [c for c in REQUIRED if c not in heading]
    if missing:
        raise ManifestError(f"{url}: missing column(s) {missing}; columns are {heading}")
    total, out, first_row, first_path = 0, [], {}, {}
    for n, values in enumerate(lines, start=1):
        if not any(v.strip() for v in values):
            continue  # a blank line (e.g. a trailing newline pair) is not a row
        total += 1
        for row in _select_row(url, n, heading, values, pid_col, selection, recommended, val_fraction):
            if isinstance(row, Row) and row.path in first_path:
                kept = first_path[row.path]
                row = BadRow(
                    n,
                    row.filepath,
                    row.sop_instance_uid,
                    reason="duplicate_file",
                    key=row.key,
                    message=f"{url}: row {n}: {row.filepath} is the file of row {kept.row_number} "
                    f"({kept.filepath}); one file, one sample: row {kept.row_number} is kept",
                )
            elif isinstance(row, Row) and row.sop_instance_uid in first_row:
                # A second row for the same image would write the same sample key twice.
                row = BadRow(
                    n,
                    row.filepath,
                    row.sop_instance_uid,
                    f"{url}: row {n}: sop_instance_uid {row.sop_instance_uid} already listed at row "
                    f"{first_row[row.sop_instance_uid]}",
                )
            elif isinstance(row, Row):
                first_row[row.sop_instance_uid], first_path[row.path] = n, row
            out.append(row)
    return total, out


def _select_row(
    url: str,
    n: int,
    heading: Sequence[str],
    values: Sequence[str],
    pid_col: str,
    selection: Selection,
    recommended: Mapping[str, str] | None,
    val_fraction: float,
) -> Iterator[Row | BadRow]:
    record = {h: v.strip() for h, v in zip(heading, values)}
    filepath, uid = record.get("filepath", ""), record.get("sop_instance_uid", "")
    if len(values) != len(heading):
        yield BadRow(
            n, filepath, uid, f"{url}: row {n}: expected {len(heading)} tab-separated fields, found {len(values)}"
        )
        return
    if not record["imaging"]:
        yield BadRow(
            n, filepath, uid, f"{url}: row {n}: empty 'imaging' field, expected {OCT_IMAGING!r} or another modality"
        )
        return
    if record["imaging"] != OCT_IMAGING:
        return
    device = device_domain(filepath, record.get("manufacturer", ""), record.get("manufacturers_model_name", ""))
    if device is not None and not selection.keeps(device, record.get("anatomic_region", "")):
        return
    empty = [c for c in (pid_col, "sop_instance_uid", "filepath") if not record.get(c)]
    if empty or device is None:
        what = f"empty field(s) {empty}" if empty else "no device folder in filepath and no manufacturer/model"
        yield BadRow(n, filepath, uid, f"{url}: row {n}: {what}")
        return
    pid = record[pid_col]
    yield Row(
        row_number=n,
        participant_id=pid,
        device=device,
        laterality=record.get("laterality", ""),
        anatomic_region=record.get("anatomic_region", ""),
        sop_instance_uid=uid,
        filepath=filepath,
        split=assign_split(pid, recommended, val_fraction),
    )


def check_inputs(
    manifest: str, *, participants: str | None, data_root: str, selection: Selection, val_fraction: float
) -> dict[str, str] | None:
    """What a job checks before it touches its output: the participants file and the manifest parse, the manifest
    selects a row, the data root is a readable folder. Returns the recommended splits (None without
    participants.tsv)."""
    recommended = read_participants(participants) if participants else None
    total, rows = parse_manifest(manifest, selection=selection, recommended=recommended, val_fraction=val_fraction)
    if not rows:
        raise ManifestError(
            f"{manifest}: none of its {total} rows is selected (OCT rows of devices "
            f"{list(selection.devices) or 'any'}, regions {list(selection.anatomic_regions) or 'any'})"
        )
    fs, path = storage.get_fs(data_root)
    if not (fs.isdir(path) and (storage.is_remote(data_root) or os.access(path, os.R_OK | os.X_OK))):
        raise ConfigError(
            f"--data-root {data_root}: not a readable folder; expected the folder the manifest's "
            f"filepath column is relative to (it holds retinal_oct/)"
        )
    return recommended


def rows_per_split(rows: Iterable[Row | BadRow]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        if isinstance(row, Row):
            counts[row.split] = counts.get(row.split, 0) + 1
    return dict(sorted(counts.items()))


def bad_row_record(row: BadRow) -> dict[str, Any]:
    """The errors.jsonl line of a row not read."""
    return {
        "key": row.key,
        "row": row.row_number,
        "filepath": row.filepath,
        "sop_instance_uid": row.sop_instance_uid,
        "stage": "manifest",
        "reason": row.reason,
        "message": row.message,
    }
