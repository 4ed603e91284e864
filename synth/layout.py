"""Where the AI-READI release keeps things, and its tables' columns: what the synthetic dataset writes and the
bad-input corpus appends to.
"""

from __future__ import annotations

MANIFEST_COLUMNS = (
    "participant_id",
    "manufacturer",
    "manufacturers_model_name",
    "anatomic_region",
    "imaging",
    "laterality",
    "height",
    "width",
    "number_of_frames",
    "pixel_spacing",
    "slice_thickness",
    "sop_instance_uid",
    "filepath",
    "reference_instance_uid",
    "reference_filepath",
)
PARTICIPANT_COLUMNS = ("participant_id", "clinical_site", "study_group", "age", "recommended_split", "retinal_oct")


def oct_path(device: str, participant_id: str, file_name: str) -> str:
    """An OCT file's path below the dataset root (the manifest's ``filepath`` is this with a leading ``/``)."""
    return f"retinal_oct/structural_oct/{device}/{participant_id}/{file_name}"
