"""Where an OCT volume's voxel spacing comes from, and whether it can be trusted.

Spacing is looked up in a fixed order and never invented (``resolve_spacing``):

1. ``SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]``: PixelSpacing = (row, column), SliceThickness;
2. ``PerFrameFunctionalGroupsSequence[*].PixelMeasuresSequence[0]``, which must agree across frames;
3. the top-level ``PixelSpacing`` / ``SliceThickness`` / ``SpacingBetweenSlices``.

Axes are ``(dz, dy, dx)`` = (B-scan pitch, row = axial, column = lateral). AI-READI stores the B-scan pitch in
SliceThickness. Where per-frame positions exist (``PlanePositionSequence`` or the
``OphthalmicFrameLocationSequence`` reference coordinates), the pitch they imply wins over a SliceThickness that
disagrees: Zeiss Cirrus files carry the lateral spacing there, 4x too small for the 512x128 cube.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_SPACING_MM = 0.0005
MAX_SPACING_MM = 1.0
# Relative disagreement above which frame positions override SliceThickness, and above which B-scan steps measured
# from positions count as irregular (positions carry eye-tracking jitter; a few % is normal).
_AGREE_TOL = 0.10
# Per-frame PixelMeasures are exact header values: anything beyond decimal-string rounding is a varying scan.
_VARY_TOL = 0.01
_PARALLEL_SIN = math.sin(math.radians(3.0))

SHARED_PM = "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]"
PER_FRAME_PM = "PerFrameFunctionalGroupsSequence[*].PixelMeasuresSequence[0]"
PLANE_POSITION = "PerFrameFunctionalGroupsSequence[*].PlanePositionSequence[0].ImagePositionPatient"
FRAME_LOCATION = "PerFrameFunctionalGroupsSequence[*].OphthalmicFrameLocationSequence[0].ReferenceCoordinates"


class SpacingError(ValueError):
    """Spacing that is missing, implausible or not a raster; ``reason`` is one of dicom.REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Spacing:
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    source: tuple[str, str, str]  # tag path each value came from
    warnings: tuple[str, ...]


def _item0(ds: Any, keyword: str) -> Any | None:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def _float(value: Any, path: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise SpacingError("implausible_spacing", f"{path} is {value!r}, expected a number in mm") from exc


def _pixel_measures(item: Any, prefix: str) -> dict[str, tuple[float, str]]:
    """The spacing values one PixelMeasures item (or the top-level dataset, prefix "") offers, keyed by axis."""
    found: dict[str, tuple[float, str]] = {}
    if item is None:
        return found
    ps = item.get("PixelSpacing")
    if ps is not None and ps != "":
        values = list(ps) if not isinstance(ps, (str, bytes)) else [ps]
        if len(values) != 2:
            raise SpacingError(
                "implausible_spacing",
                f"{prefix}PixelSpacing is {ps!r}, expected 2 values (row, column)",
            )
        found["dy"] = (_float(values[0], f"{prefix}PixelSpacing[0]"), f"{prefix}PixelSpacing[0]")
        found["dx"] = (_float(values[1], f"{prefix}PixelSpacing[1]"), f"{prefix}PixelSpacing[1]")
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = item.get(keyword)
        if value is not None and value != "" and "dz" not in found:
            found["dz"] = (_float(value, f"{prefix}{keyword}"), f"{prefix}{keyword}")
    return found


def _per_frame_measures(ds: Any) -> dict[str, tuple[float, str]]:
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    per_frame = [
        _pixel_measures(
            _item0(f, "PixelMeasuresSequence"), f"PerFrameFunctionalGroupsSequence[{i}].PixelMeasuresSequence[0]."
        )
        for i, f in enumerate(frames)
    ]
    found: dict[str, tuple[float, str]] = {}
    for axis in ("dz", "dy", "dx"):
        values = [(m[axis][0], m[axis][1]) for m in per_frame if axis in m]
        if not values:
            continue
        lo, hi = min(v for v, _ in values), max(v for v, _ in values)
        if hi - lo > _VARY_TOL * max(abs(hi), 1e-12):
            raise SpacingError(
                "non_raster_scan",
                f"non-raster scan: {axis} varies by frame in {PER_FRAME_PM} ({lo:g} to {hi:g} mm)",
            )
        found[axis] = (values[0][0], PER_FRAME_PM + "." + values[0][1].rsplit(".", 1)[1])
    return found


def _pitch_from_positions(ds: Any) -> float | None:
    """B-scan pitch (mm) from per-frame ImagePositionPatient, or None when there are no such positions."""
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    positions = []
    for f in frames:
        item = _item0(f, "PlanePositionSequence")
        pos = item.get("ImagePositionPatient") if item is not None else None
        if pos is None or len(pos) != 3:
            return None
        positions.append([float(v) for v in pos])
    if len(positions) < 2:
        return None
    steps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
    return _uniform(steps, PLANE_POSITION)


def _uniform(steps: np.ndarray, path: str) -> float:
    pitch = float(np.median(steps))
    if pitch <= 0 or np.max(np.abs(steps - pitch)) > _AGREE_TOL * pitch:
        raise SpacingError(
            "non_raster_scan",
            f"non-raster scan: B-scan steps from {path} vary ({steps.min():g} to {steps.max():g}), "
            "expected a regular raster",
        )
    return pitch


def _pitch_from_frame_locations(ds: Any, columns: int, dx: float | None) -> float | None:
    """B-scan pitch (mm) from the lines each B-scan traces on the reference fundus image.

    The reference image's own pixel spacing is not in the OCT file, so the pitch is measured in reference pixels
    and scaled by the B-scan's known physical length ((columns - 1) * dx over the line's length in reference pixels).
    """
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    lines = []
    for i, f in enumerate(frames):
        item = _item0(f, "OphthalmicFrameLocationSequence")
        coords = item.get("ReferenceCoordinates") if item is not None else None
        if coords is None:
            return None
        coords = [float(c) for c in coords]
        if len(coords) != 4:
            raise SpacingError(
                "non_raster_scan",
                f"non-raster scan: {FRAME_LOCATION.replace('*', str(i))} has {len(coords) // 2} points "
                "(a circle or curve), expected a straight B-scan line (2 points)",
            )
        lines.append(coords)
    if len(lines) < 2:
        return None
    pts = np.asarray(lines).reshape(-1, 2, 2)  # (frame, start/end, row/col)
    vec = pts[:, 1] - pts[:, 0]
    length = np.linalg.norm(vec, axis=1)
    if np.any(length <= 0):
        raise SpacingError("non_raster_scan", f"non-raster scan: a B-scan line in {FRAME_LOCATION} has zero length")
    unit = vec / length[:, None]
    cross = unit[:, 0] * unit[0, 1] - unit[:, 1] * unit[0, 0]
    if np.max(np.abs(cross)) > _PARALLEL_SIN:
        raise SpacingError(
            "non_raster_scan",
            f"non-raster scan: B-scan lines in {FRAME_LOCATION} are not parallel (radial scan), expected a raster",
        )
    centres = pts.mean(axis=1)
    d = np.diff(centres, axis=0)
    steps = np.abs(d[:, 0] * unit[0, 1] - d[:, 1] * unit[0, 0])  # distance across the lines, reference px
    pitch_px = _uniform(steps, FRAME_LOCATION)
    if dx is None or columns < 2:
        return None
    return round(pitch_px * (columns - 1) * dx / float(np.median(length)), 7)


def _check_plausible(value: float, path: str) -> None:
    if not MIN_SPACING_MM <= value <= MAX_SPACING_MM:
        raise SpacingError(
            "implausible_spacing",
            f"{path} is {value:g} mm, expected {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm for OCT",
        )


def resolve_spacing(ds: Any, *, columns: int) -> Spacing:
    """``(dz, dy, dx)`` in mm with the tag path each came from; raises SpacingError, never guesses."""
    shared = _item0(_item0(ds, "SharedFunctionalGroupsSequence"), "PixelMeasuresSequence")
    levels: Sequence[dict[str, tuple[float, str]]] = (
        _pixel_measures(shared, SHARED_PM + "."),
        _per_frame_measures(ds),
        _pixel_measures(ds, ""),
    )
    chosen: dict[str, tuple[float, str]] = {}
    for axis in ("dz", "dy", "dx"):
        for found in levels:
            if axis in found:
                chosen[axis] = found[axis]
                break

    # Every value a tag gave is checked before any is used (dx scales the frame-location pitch).
    for value, path in chosen.values():
        _check_plausible(value, path)
    warnings: list[str] = []
    dx = chosen["dx"][0] if "dx" in chosen else None
    pitch, pitch_path = _pitch_from_positions(ds), PLANE_POSITION
    if pitch is None:
        pitch, pitch_path = _pitch_from_frame_locations(ds, columns, dx), FRAME_LOCATION
    if pitch is not None:
        if "dz" not in chosen:
            chosen["dz"] = (pitch, pitch_path)
        elif abs(chosen["dz"][0] - pitch) > _AGREE_TOL * pitch:
            warnings.append(
                f"{chosen['dz'][1]} is {chosen['dz'][0]:g} mm but the frame positions imply a B-scan pitch of "
                f"{pitch:g} mm; using the pitch from {pitch_path}"
            )
            chosen["dz"] = (pitch, pitch_path)

    names = {
        "dz": "B-scan pitch (SliceThickness or SpacingBetweenSlices)",
        "dy": "row spacing (PixelSpacing[0])",
        "dx": "column spacing (PixelSpacing[1])",
    }
    for axis in ("dz", "dy", "dx"):
        if axis not in chosen:
            raise SpacingError(
                "missing_spacing",
                f"missing {names[axis]}: looked in {SHARED_PM}, {PER_FRAME_PM} and the top-level PixelSpacing / "
                "SliceThickness / SpacingBetweenSlices",
            )
        _check_plausible(*chosen[axis])
    return Spacing(
        spacing_mm=(chosen["dz"][0], chosen["dy"][0], chosen["dx"][0]),
        source=(chosen["dz"][1], chosen["dy"][1], chosen["dx"][1]),
        warnings=tuple(warnings),
    )
