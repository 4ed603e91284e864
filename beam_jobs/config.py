"""Per-volume preprocessing settings (what one DICOM becomes), separate from the Beam job's own options.

    from beam_jobs.config import load_preprocess_config
    config = load_preprocess_config("configs/preprocess_native.yaml", overrides=["target_shape=[64,256,256]"])

The dataclass defaults are the seed preset (configs/preprocess_seed.yaml restates them with comments), so a worker
that has the package but not the configs/ folder (a Dataflow wheel) gets the same default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from beam_jobs.dicom import DEFAULT_MAX_DECODED_BYTES
from shards.typed_config import ConfigError, load_yaml


@dataclass
class PreprocessConfig:
    # (dz, dy, dx) mm: B-scan pitch, axial, lateral. The seed's grid: 3.2 x 7.68 x 7.68 mm at 64 x 384 x 384.
    target_spacing_mm: tuple[float, float, float] = (0.05, 0.02, 0.02)
    target_shape: tuple[int, int, int] = (64, 384, 384)  # (D, H, W)
    # Decompression-bomb guard: frames x rows x columns x bytes declared in the header, checked before decoding.
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    # Accept non-OCT SOP classes that still carry a 3D grayscale volume with plausible spacing.
    allow_other_sop_classes: bool = False

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.target_spacing_mm):
            raise ConfigError(f"target_spacing_mm must be positive (dz, dy, dx) mm, found {self.target_spacing_mm}")
        if any(n <= 0 for n in self.target_shape):
            raise ConfigError(f"target_shape must be positive (D, H, W), found {self.target_shape}")
        if self.max_decoded_bytes <= 0:
            raise ConfigError(f"max_decoded_bytes must be positive, found {self.max_decoded_bytes}")


def load_preprocess_config(path: str | None = None, overrides: Sequence[str] = ()) -> PreprocessConfig:
    """A YAML preset (local or gs://; None = the dataclass defaults) plus ``key=value`` overrides."""
    return load_yaml(PreprocessConfig, path, overrides)
