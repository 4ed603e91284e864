"""The per-volume work of the preprocessing job: DICOM bytes + manifest row -> one encoded shard sample.

    from beam_jobs.volume_to_sample import dicom_to_sample, dicom_to_sample_and_header
    sample = dicom_to_sample(data, row=row, config=load_preprocess_config(None), split="train")
    sample, header = dicom_to_sample_and_header(data, row=row, config=config, split="train")  # + the file's own
                                                                    # SOPInstanceUID and PatientID, for the job

Read (all header checks before decoding), resample to the configured grid, fill the contract's metadata and encode.
Bad input raises ``beam_jobs.dicom.DicomReadError`` with its reason; the Beam job routes it to errors.jsonl.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from beam_jobs.config import PreprocessConfig
from beam_jobs.dicom import OctHeader, read_oct_dicom
from beam_jobs.resample import resample_to_grid
from shards import FORMAT_VERSION, encode_sample, make_key

ROW_KEYS = ("participant_id", "device", "laterality", "anatomic_region", "sop_instance_uid", "filepath")


def dicom_to_sample(data: bytes, *, row: Mapping[str, Any], config: PreprocessConfig, split: str) -> dict[str, Any]:
    return dicom_to_sample_and_header(data, row=row, config=config, split=split)[0]


def dicom_to_sample_and_header(
    data: bytes, *, row: Mapping[str, Any], config: PreprocessConfig, split: str
) -> tuple[dict[str, Any], OctHeader]:
    """The encoded sample and the file's header (which says what the file itself claims to be)."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"dicom_to_sample: row for {row.get('filepath', '<no filepath>')!r} lacks {missing}")
    volume, header = read_oct_dicom(
        data,
        name=str(row["filepath"]),
        max_decoded_bytes=config.max_decoded_bytes,
        allow_other_sop_classes=config.allow_other_sop_classes,
    )
    source_shape = list(volume.shape)
    resampled = resample_to_grid(volume, header.spacing_mm, config.target_spacing_mm, config.target_shape)
    del volume  # the decoded volume is the largest object; let it go before encoding
    out = resampled.volume
    meta = {
        "format_version": FORMAT_VERSION,
        "key": make_key(str(row["device"]), str(row["participant_id"]), str(row["sop_instance_uid"])),
        "participant_id": str(row["participant_id"]),
        "device": str(row["device"]),
        "laterality": str(row["laterality"]),
        "anatomic_region": str(row["anatomic_region"]),
        "sop_instance_uid": str(row["sop_instance_uid"]),
        "source_path": str(row["filepath"]),
        "source_shape": source_shape,
        "source_spacing_mm": [float(s) for s in header.spacing_mm],
        "target_spacing_mm": [float(s) for s in config.target_spacing_mm],
        "shape": list(out.shape),
        "dtype": str(out.dtype),
        "fill_fraction": float(resampled.fill_fraction),
        "crop_offsets": [int(o) for o in resampled.crop_offsets],
        "intensity_mean": float(resampled.intensity_mean),
        "intensity_std": float(resampled.intensity_std),
        "split": split,
    }
    return encode_sample(out, meta), header
