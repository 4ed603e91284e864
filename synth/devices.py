"""The scanners of the AI-READI release as ``octjepa synth`` models them: per device the real frames x rows x
columns and spacings, the names in its files and folders, and how its images look; the scan protocols that differ
from a device's macula cube; and the shrinking of a grid that keeps its physical extent (``--scale``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from synth.volumes import Style


@dataclass(frozen=True)
class ScannerModel:
    name: str  # folder name in the AI-READI layout
    short: str  # in file names
    manufacturer: str
    model: str
    shape: tuple[int, int, int]  # (frames, rows, columns) of the real volumes
    spacing_mm: tuple[float, float, float]  # (B-scan pitch, row, column)
    reference: str  # the fundus image folder the OCT points to
    style: Style
    slice_thickness_is_lateral: bool = False  # the Cirrus quirk


DEVICES: dict[str, ScannerModel] = {
    "heidelberg_spectralis": ScannerModel(
        "heidelberg_spectralis",
        "spectralis",
        "Heidelberg Engineering",
        "Spectralis",
        (61, 496, 768),
        (0.1208, 0.003872, 0.01136),
        "ir",
        Style(gain=0.95, floor=0.03, speckle_k=6.0, retina_top=0.25),
    ),
    "topcon_maestro2": ScannerModel(
        "topcon_maestro2",
        "maestro2",
        "Topcon",
        "Maestro2",
        (128, 885, 512),
        (0.04724, 0.0026, 0.01174),
        "cfp",
        Style(gain=0.70, floor=0.10, speckle_k=2.0, retina_top=0.35),
    ),
    "topcon_triton": ScannerModel(
        "topcon_triton",
        "triton",
        "Topcon",
        "Triton",
        (256, 992, 512),
        (0.02745, 0.0026, 0.01370),
        "cfp",
        Style(gain=0.80, floor=0.07, speckle_k=2.5, retina_top=0.30),
    ),
    "zeiss_cirrus": ScannerModel(
        "zeiss_cirrus",
        "cirrus",
        "Carl Zeiss Meditec",
        "Cirrus HD-OCT 5000",
        (128, 1024, 512),
        (0.04724, 0.001955, 0.01174),
        "ir",
        Style(gain=0.60, floor=0.12, speckle_k=1.5, retina_top=0.30),
        slice_thickness_is_lateral=True,
    ),
}
ALL_DEVICES = tuple(DEVICES)
CIRRUS_200 = ((200, 1024, 200), (0.03015, 0.001955, 0.03015))  # the 200x200 cube: lateral = pitch, quirk harmless
ONH_RADIAL_FRAMES, ONH_CIRCLES = 24, 3  # Spectralis ONH: 24 radial B-scans + 3 circle scans = 27 frames
_MAX_SCALED_PITCH_MM = 0.4  # scaled-down volumes keep enough B-scans that the pitch stays plausible
_MIN_FRAME_SIDE = 32  # openjpeg encodes 6 wavelet resolutions, which needs frames of at least 32 x 32


def scaled_geometry(
    shape: Sequence[int],
    spacing: Sequence[float],
    scale: float,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shrink a grid by ``scale`` per axis, keeping its physical extent (spacing grows to match)."""
    if scale == 1.0:
        return tuple(shape), tuple(spacing)
    out_shape, out_spacing = [], []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        extent = n * s
        m = max(_MIN_FRAME_SIDE if axis else 2, round(n * scale))
        if axis == 0:
            m = max(m, math.ceil(extent / _MAX_SCALED_PITCH_MM))
        out_shape.append(min(n, m))
        out_spacing.append(round(extent / min(n, m), 6))
    return tuple(out_shape), tuple(out_spacing)
