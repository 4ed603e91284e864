"""A corpus of bad inputs, one per failure the pipeline must route instead of crash on.

    octjepa synth --out /tmp/aireadi --participants 4 --scale 0.1 --broken
    python -c "from synth.bad_inputs import write_bad_inputs as w; w('/tmp/d', '/tmp/d/retinal_oct/manifest.tsv')"

``write_bad_inputs`` appends one manifest row per kind (same columns and heading as the manifest) and writes the
files; it returns ``{sop_instance_uid or "row:<n>": expected reason}`` (``n`` = 1-based data row, heading = row 0).
Every file but the deliberate defect is a well-formed small OCT DICOM made by the synthetic dataset's writer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from shards import storage
from synth.devices import DEVICES
from synth.dicom import dataset_bytes, new_uid, oct_dataset, radial_frame_locations
from synth.layout import MANIFEST_COLUMNS, oct_path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_SHAPE, _SPACING = (8, 64, 48), (0.1, 0.01, 0.05)  # small, with plausible spacing


def _no_pixels(ds: Dataset) -> None:
    del ds.PixelData


def _wrong_sop(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE


def _missing_spacing(ds: Dataset) -> None:
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence


def _implausible_spacing(ds: Dataset) -> None:
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = ["0", "0.05"]


def _corrupt_codestream(ds: Dataset) -> None:
    # Valid encapsulation (items, offsets), but each frame's JPEG 2000 codestream is noise.
    rng = np.random.default_rng(7)
    ds.PixelData = encapsulate([rng.integers(0, 256, 400, dtype=np.uint8).tobytes() for _ in range(_SHAPE[0])])


def _bomb(ds: Dataset) -> None:
    ds.NumberOfFrames, ds.Rows, ds.Columns = 100000, 496, 768  # 38 GB decoded, declared by a tiny file


def _zero_frames(ds: Dataset) -> None:
    ds.NumberOfFrames = 0


def _rgb(ds: Dataset) -> None:
    d, h, w = _SHAPE
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.zeros((d, h, w, 3), dtype=np.uint8).tobytes()


def _non_raster(ds: Dataset) -> None:
    lines = radial_frame_locations(_SHAPE[0], 0, _SHAPE[2], _SPACING[2], 768)
    for item, coords in zip(ds.PerFrameFunctionalGroupsSequence, lines):
        item.OphthalmicFrameLocationSequence[0].ReferenceCoordinates = coords


# kind -> (transfer syntax written, defect applied to the data set); the kind is the expected reason.
_DATASET_DEFECTS: dict[str, tuple[str, Callable[[Dataset], None]]] = {
    "no_pixel_data": (ExplicitVRLittleEndian, _no_pixels),
    "wrong_sop_class": (ExplicitVRLittleEndian, _wrong_sop),
    "missing_spacing": (JPEG2000Lossless, _missing_spacing),
    "implausible_spacing": (JPEG2000Lossless, _implausible_spacing),
    "corrupt_codestream": (JPEG2000Lossless, _corrupt_codestream),
    "too_large": (ExplicitVRLittleEndian, _bomb),
    "zero_frames": (ExplicitVRLittleEndian, _zero_frames),
    "not_grayscale": (ExplicitVRLittleEndian, _rgb),
    "non_raster_scan": (JPEG2000Lossless, _non_raster),
}


def _read_heading(manifest_path: str) -> tuple[list[str], str]:
    with storage.open_url(manifest_path, "rb") as f:
        text = f.read().decode("utf-8")
    lines = text.split("\n")
    heading = lines[0].rstrip("\r").split("\t")
    if heading[1:] != list(MANIFEST_COLUMNS[1:]) or heading[0] not in ("participant_id", "person_id"):
        raise ValueError(f"{manifest_path}: heading {heading} is not the AI-READI manifest heading {MANIFEST_COLUMNS}")
    return heading, text


def write_bad_inputs(root: str, manifest_path: str) -> dict[str, str]:
    """Append one row per bad-input kind to the manifest and write its file; returns {uid or "row:<n>": reason}."""
    heading, text = _read_heading(manifest_path)
    if not text.endswith("\n"):
        text += "\n"
    data_lines = text.split("\n")[1:-1]
    if not data_lines:
        raise ValueError(f"{manifest_path}: no data rows to borrow a participant from")
    pid = data_lines[0].split("\t")[0]
    device = DEVICES["heidelberg_spectralis"]
    rng = np.random.default_rng(12345)
    expected: dict[str, str] = {}
    rows: list[list[str]] = []

    def add_row(kind: str, uid: str, filepath: str) -> None:
        d, h, w = _SHAPE
        row = {
            "participant_id": pid,
            "manufacturer": device.manufacturer,
            "manufacturers_model_name": device.model,
            "anatomic_region": "Macula",
            "imaging": "OCT",
            "laterality": "R",
            "height": h,
            "width": w,
            "number_of_frames": d,
            "pixel_spacing": f"[{_SPACING[1]}, {_SPACING[2]}]",
            "slice_thickness": str(_SPACING[0]),
            "sop_instance_uid": uid,
            "filepath": filepath,
            "reference_instance_uid": "",
            "reference_filepath": "",
        }
        rows.append([str(row[c]) for c in MANIFEST_COLUMNS])
        expected[uid] = kind

    def write(kind: str, payload: bytes) -> tuple[str, str]:
        uid = new_uid(rng)
        rel = oct_path(device.name, pid, f"{pid}_bad_{kind}_{uid}.dcm")
        with storage.open_url(storage.join(root, rel), "wb") as f:
            f.write(payload)
        return uid, "/" + rel

    def good_dataset(transfer_syntax: str) -> tuple[Dataset, str]:
        uid = new_uid(rng)
        volume = rng.integers(0, 200, size=_SHAPE, dtype=np.uint8)
        ds = oct_dataset(
            volume=volume,
            spacing_mm=_SPACING,
            device=device,
            participant_id=pid,
            laterality="R",
            sop_instance_uid=uid,
            reference_uid=new_uid(rng),
            rng=rng,
            transfer_syntax=transfer_syntax,
        )
        return ds, uid

    # Files whose defect is in the bytes, not the data set.
    uid = new_uid(rng)
    add_row("missing_file", uid, "/" + oct_path(device.name, pid, f"{pid}_bad_missing_{uid}.dcm"))
    ds, _ = good_dataset(ExplicitVRLittleEndian)
    whole = dataset_bytes(ds)
    add_row("truncated", *write("truncated", whole[: len(whole) * 3 // 5]))
    add_row("not_dicom", *write("not_dicom", b"participant,scan\n1001,this is a CSV export, not a DICOM file\n" * 20))
    for kind, (ts, defect) in _DATASET_DEFECTS.items():
        ds, _ = good_dataset(ts)
        defect(ds)
        add_row(kind, *write(kind, dataset_bytes(ds)))

    lines = ["\t".join(r) for r in rows]
    # A malformed row: the column count is wrong (a field lost its tab), so no value can be trusted.
    malformed_uid = new_uid(rng)
    lines.append(
        "\t".join(
            [
                pid,
                device.manufacturer,
                device.model,
                "Macula",
                "OCT",
                "R 64",
                "48",
                "8",
                malformed_uid,
                "/" + oct_path(device.name, pid, f"{malformed_uid}.dcm"),
            ]
        )
    )
    expected[f"row:{len(data_lines) + len(lines)}"] = "malformed_row"
    with storage.open_url(manifest_path, "wb") as f:
        f.write((text + "\n".join(lines) + "\n").encode("utf-8"))
    return expected
