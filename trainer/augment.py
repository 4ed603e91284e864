"""3D augmentation, drawn on the host and applied where it is cheapest.

On the host, in the stored dtype: the crop (or zero-pad) to the training shape, a view that the batch stack
copies once. Decided on the host, applied on the accelerator by ``trainer.data.to_model_input``: the lateral
flip (a per-sample flag; mirroring a uint8 volume on the CPU is a strided byte copy that costs several times the
shard read, an accelerator does it in its first elementwise pass) and the z-score + intensity jitter folded into
one per-sample (scale, shift). Voxels stay uint8/uint16 until the device: a quarter of float32's host-to-device
traffic and no float copy of the volume on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def crop_starts(shape: Sequence[int], crop: Sequence[int], rng: np.random.Generator | None) -> tuple[int, ...]:
    """Per-axis start of the crop window: uniform when ``rng`` is given, centred otherwise; 0 where the axis is
    smaller than the crop (that axis is padded instead)."""
    starts = []
    for size, want in zip(shape, crop):
        slack = size - want
        if slack <= 0:
            starts.append(0)
        elif rng is None:
            starts.append(slack // 2)
        else:
            starts.append(int(rng.integers(slack + 1)))
    return tuple(starts)


def crop_or_pad(volume: np.ndarray, crop: Sequence[int], starts: Sequence[int]) -> np.ndarray:
    """The ``crop``-shaped window of a (D, H, W) volume at ``starts``; axes shorter than the crop are zero-padded
    symmetrically (zero is the OCT background, so padding reads as empty space, not as tissue)."""
    if volume.ndim != 3 or len(crop) != 3:
        raise ValueError(f"crop_or_pad takes a (D, H, W) volume and a 3-axis crop, got {volume.shape} and {crop}")
    window = volume[tuple(slice(s, s + c) for s, c in zip(starts, crop))]
    if window.shape == tuple(crop):
        return window
    pads = [((c - n) // 2, c - n - (c - n) // 2) for n, c in zip(window.shape, crop)]
    return np.pad(window, pads, mode="constant", constant_values=0)


def flip_lateral(volume: np.ndarray) -> np.ndarray:
    """Mirror the lateral (W, last) axis: a left eye's scan looks like a right eye's. (Reference for tests; the
    loader flips on the device, see the module docstring.)"""
    return volume[..., ::-1]


def scale_shift(mean: float, std: float, jitter: float, rng: np.random.Generator | None) -> tuple[float, float]:
    """(scale, shift) with ``v * scale + shift = a * (v - mean) / std + b``, a in [1-j, 1+j], b in [-j, j].

    With no ``rng`` (or ``jitter=0``) it is the plain z-score with the sample's stored statistics.
    """
    if std <= 0:
        raise ValueError(f"intensity std must be > 0, got {std}")
    a, b = 1.0, 0.0
    if rng is not None and jitter > 0:
        a = 1.0 + float(rng.uniform(-jitter, jitter))
        b = float(rng.uniform(-jitter, jitter))
    return a / std, b - a * mean / std


def draw_view(
    shape: Sequence[int],
    meta: dict,
    crop: Sequence[int],
    *,
    rng: np.random.Generator | None,
    flip: bool,
    jitter: float,
) -> tuple[tuple[int, ...], bool, float, float]:
    """One sample's random view of a stored ``shape`` volume, drawn before its voxels are read: (crop starts, flip
    W?, scale, shift). ``rng=None`` gives the deterministic eval view (centre crop, no flip, no jitter)."""
    starts = crop_starts(shape, crop, rng)
    flipped = bool(rng is not None and flip and rng.random() < 0.5)
    scale, shift = scale_shift(meta["intensity_mean"], meta["intensity_std"], jitter, rng)
    return starts, flipped, scale, shift


def augment(
    volume: np.ndarray,
    meta: dict,
    crop: Sequence[int],
    *,
    rng: np.random.Generator | None,
    flip: bool,
    jitter: float,
) -> tuple[np.ndarray, bool, float, float]:
    """``draw_view`` applied to a decoded volume: (cropped volume, flip W?, scale, shift). The volume is a view where
    it can be (the batch copies it)."""
    starts, flipped, scale, shift = draw_view(volume.shape, meta, crop, rng=rng, flip=flip, jitter=jitter)
    return crop_or_pad(volume, crop, starts), flipped, scale, shift
