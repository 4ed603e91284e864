"""The preprocessing job's typed settings: what one DICOM becomes (``PreprocessConfig``, the presets' schema) and the
job's own options (``PreprocessOptions``: inputs, output, selection, sharding, and that config), which the index
records.

    from beam_jobs.config import load_preprocess_config
    config = load_preprocess_config("configs/preprocess_native.yaml", overrides=["target_shape=[64,256,256]"])
    opts, beam_args = beam_jobs.preprocess.parse_options(argv)      # the command line -> PreprocessOptions

The dataclass defaults are the seed preset (configs/preprocess_seed.yaml restates them with comments), so a worker
that has the package but not the configs/ folder (a Dataflow wheel) gets the same default. Both validate when built:
a bad value is a ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from beam_jobs import manifest as mf
from shards import TARGET_SHARD_BYTES, storage
from shards.typed_config import ConfigError, load_yaml, to_dict

DEFAULT_MAX_DECODED_BYTES = 1 << 30  # 4x the largest real AI-READI volume (Triton 256x992x512 at 16 bit)


@dataclasses.dataclass
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


def default_samples_per_shard(config: PreprocessConfig) -> int:
    """About TARGET_SHARD_BYTES per shard at the configured output shape (16-bit worst case)."""
    return max(1, TARGET_SHARD_BYTES // (math.prod(config.target_shape) * 2))


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
    manifest: str
    data_root: str
    output: str
    overwrite: bool = False  # replace the complete set the output holds
    participants: str | None = None
    devices: tuple[str, ...] = ()  # empty: every device
    anatomic_regions: tuple[str, ...] = ()  # empty: every region
    samples_per_shard: int | None = None  # None: default_samples_per_shard(preprocess)
    val_fraction: float = mf.DEFAULT_VAL_FRACTION
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        # Workers may run in another directory (local worker processes do), so local paths are made absolute.
        for name in ("manifest", "data_root", "output", "participants"):
            value = getattr(self, name)
            if value is not None and not storage.is_remote(value):
                object.__setattr__(self, name, os.path.abspath(value))
        if self.samples_per_shard is None:
            object.__setattr__(self, "samples_per_shard", default_samples_per_shard(self.preprocess))
        if self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        unknown = sorted(set(self.devices) - set(mf.DEVICES))
        if unknown:
            raise ConfigError(f"--devices: unknown device(s) {unknown}; known: {list(mf.DEVICES)}")

    @property
    def selection(self) -> mf.Selection:
        return mf.Selection(devices=self.devices, anatomic_regions=self.anatomic_regions)

    def recorded(self) -> dict[str, Any]:
        """What index["config"] records: everything that decides the output's bytes (not the output path, so two
        runs into two folders give identical indexes)."""
        return {k: v for k, v in to_dict(self).items() if k not in ("output", "overwrite")}
