"""A small, complete fake shard set written through the shards contract (for trainer tests; no Beam, no DICOM).

    from tests.trainer.shardset_fixture import make_shard_set
    index = make_shard_set(str(tmp_path / "set"), n_train=24, n_val=8)

Every sample is a valid contract sample: a uint8 volume of ``shape`` whose voxels are all
``sample_number % 200 + 20`` plus small noise, so a test can tell samples apart from the pixels alone, and
metadata whose intensity mean/std are the volume's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import shards
from shards.synthetic import fake_meta, write_set

DEVICES = ("heidelberg_spectralis", "topcon_triton", "zeiss_cirrus")
# Train-config overrides for CPU tests: ViT-Tiny narrowed to 2 blocks of width 48, and a 1-block predictor.
NARROW_TINY = ["model.encoder.embed_dim=48", "model.encoder.depth=2", "model.encoder.num_heads=2"]
SMALL_PREDICTOR = ["model.predictor.depth=1", "model.predictor.embed_dim=32", "model.predictor.num_heads=2"]
SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")


def train_args(shards: str, run_dir: Path | str, *overrides: str) -> list[str]:
    """`octjepa train` arguments: the smoke preset on a ``make_shard_set`` set of 8x32x32 volumes, then
    ``overrides``."""
    return [
        "--config",
        SMOKE,
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        "model.encoder.input_shape=[8,32,32]",
        "data.crop_shape=[8,32,32]",
        *overrides,
    ]


def make_meta(*, split: str, number: int, device: str, shape: Sequence[int], volume: np.ndarray) -> dict[str, Any]:
    """Contract metadata for fake sample ``number`` of ``split`` (UIDs differ per split, so keys never collide)."""
    return fake_meta(
        device,
        number,
        "L" if number % 2 else "R",
        shape,
        split,
        uid=f"1.2.826.0.1.{shards.SPLITS.index(split) + 1}.{number}",
        anatomic_region="macula",
        source_spacing_mm=[0.1, 0.004, 0.01],
        target_spacing_mm=[0.1, 0.004, 0.01],
        dtype=str(volume.dtype),
        intensity_mean=float(volume.mean()),
        intensity_std=float(max(volume.std(), 1e-3)),
    )


def make_volume(number: int, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A uint8 (D, H, W) volume whose level identifies the sample (``number % 200 + 20``) plus noise in [0, 8)."""
    base = number % 200 + 20
    return (base + rng.integers(0, 8, size=tuple(shape))).astype(np.uint8)


def _chunks(n: int, samples_per_shard: int | Sequence[int]) -> list[int]:
    """Shard sizes: an int repeats (the last shard takes the rest); a sequence is used as given (must sum to n)."""
    if isinstance(samples_per_shard, int):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
        sizes = [samples_per_shard] * (n // samples_per_shard)
        return sizes + ([n % samples_per_shard] if n % samples_per_shard else [])
    sizes = [int(s) for s in samples_per_shard]
    if sum(sizes) != n or min(sizes, default=1) <= 0:
        raise ValueError(f"samples_per_shard {sizes} must be positive and sum to {n}")
    return sizes


def make_shard_set(
    root: str,
    *,
    n_train: int = 24,
    n_val: int = 8,
    shape: tuple[int, int, int] = (8, 32, 32),
    devices: Sequence[str] = DEVICES,
    samples_per_shard: int | Sequence[int] = 4,
    val_samples_per_shard: int | Sequence[int] | None = None,
    seed: int = 0,
    dtypes: Sequence[str] = ("uint8",),
) -> dict[str, Any]:
    """Write a complete shard set (shards, empty errors.jsonl, index.json last) under ``root``; return its index.

    Devices are assigned round-robin over ``devices`` by sample number; repeat a name to make that device dominate
    (``devices=("a", "a", "a", "b")`` gives a 3:1 mix). ``samples_per_shard`` may be a list to make unequal
    shards (it then applies to train; ``val_samples_per_shard`` defaults to 4 per shard in that case).
    ``dtypes`` are assigned round-robin by sample number too (same voxel values, stored at that dtype).
    """
    rng = np.random.default_rng(seed)
    if val_samples_per_shard is None:
        val_samples_per_shard = samples_per_shard if isinstance(samples_per_shard, int) else 4
    shards_by_split: dict[str, list[list[dict[str, Any]]]] = {}
    for split, n, per_shard in (("train", n_train, samples_per_shard), ("val", n_val, val_samples_per_shard)):
        number = 0
        for size in _chunks(n, per_shard):
            encoded = []
            for _ in range(size):
                device = devices[number % len(devices)]
                volume = make_volume(number, shape, rng).astype(dtypes[number % len(dtypes)])
                meta = make_meta(split=split, number=number, device=device, shape=shape, volume=volume)
                encoded.append(shards.encode_sample(volume, meta))
                number += 1
            shards_by_split.setdefault(split, []).append(encoded)
    return write_set(
        root,
        shards_by_split,
        config={"fixture": "tests.trainer.shardset_fixture", "shape": list(shape), "seed": seed},
        created_by="tests.trainer.shardset_fixture",
    )
