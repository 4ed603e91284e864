"""Resampling an OCT volume to a fixed physical grid, then cropping or padding it to a fixed shape.

Grid convention: the source's physical extent (``n * spacing`` per axis, voxel-centred) is resampled to
``round(n * spacing / target)`` voxels whose centre coincides with the source's centre. The output window of
``target_shape`` is then placed on that grid: centred on the B-scan and lateral axes, and on the axial axis centred
on the retina (the intensity-weighted centre of the depth profile), clamped so the window never leaves the scan
when the scan is longer and never cuts the scan when it is shorter. Voxels outside the grid are 0 ("padding").

Only the window's voxels are computed, by separable linear interpolation in float32: each source B-scan the window
needs is resampled in-plane once (the axis that shrinks most first), and each output B-scan blends two of those.
Memory is the input, the output and a few B-scans; the result is rounded back to the source dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Resampled:
    volume: np.ndarray  # target shape (D, H, W), source dtype
    crop_offsets: tuple[int, int, int]  # start of the window in the resampled grid; negative = padding before
    fill_fraction: float  # fraction of the window's voxels that come from the scan (the rest is padding)
    intensity_mean: float  # over the real (non-padding) voxels
    intensity_std: float


def resampled_size(n: int, spacing: float, target: float) -> int:
    return max(1, int(round(n * spacing / target)))


def retina_centre(volume: np.ndarray) -> float:
    """Intensity-weighted centre of the depth (H) profile, in source rows, above the background level.

    The background (vitreous, deep tissue) is most rows, so the profile's median is a fair noise floor to subtract;
    subsampling B-scans and columns keeps this a small fraction of the resampling cost.
    """
    d, h, w = volume.shape
    sub = volume[:: max(1, d // 16), :, :: max(1, w // 64)]
    profile = sub.mean(axis=(0, 2), dtype=np.float64)
    weight = np.clip(profile - np.median(profile), 0.0, None)
    total = weight.sum()
    if total <= 0:
        return (h - 1) / 2
    return float((weight * np.arange(h)).sum() / total)


def _window_offset(n_grid: int, size: int, centre: float | None) -> int:
    """Start of a ``size`` window on an ``n_grid`` grid: centred, or centred on ``centre`` but kept on the scan."""
    if centre is None:
        return (n_grid - size) // 2
    lo, hi = min(0, n_grid - size), max(0, n_grid - size)
    return int(min(max(int(round(centre - size / 2)), lo), hi))


def _axis_weights(n_src: int, spacing: float, target: float, n_grid: int, offset: int, size: int):
    """For the window's positions on one axis: (valid slice, i0, i1, w1) of linear interpolation into the source."""
    k = np.arange(offset, offset + size)
    valid = (k >= 0) & (k < n_grid)
    start = int(np.argmax(valid)) if valid.any() else 0
    stop = start + int(valid.sum())
    k = k[start:stop]
    # Grid centre == source centre, in source index units (voxel centres at integers).
    x = (k + 0.5 - n_grid / 2) * (target / spacing) + n_src / 2 - 0.5
    x = np.clip(x, 0.0, n_src - 1)  # the outer half-voxel of the extent repeats the edge voxel
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_src - 1)
    w1 = (x - i0).astype(np.float32)
    return slice(start, stop), i0, i1, w1


def _interp_axis(a: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """Linear interpolation of a 2D array along ``axis`` (float32 result)."""
    w1 = w1[:, None] if axis == 0 else w1[None, :]
    lo = np.take(a, i0, axis=axis).astype(np.float32, copy=False)
    hi = np.take(a, i1, axis=axis).astype(np.float32, copy=False)
    hi -= lo
    hi *= w1
    lo += hi
    return lo


def resample_to_grid(
    volume: np.ndarray,
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float],
    target_shape: Sequence[int],
) -> Resampled:
    """Resample ``volume`` (D, H, W) from ``spacing_mm`` to ``target_spacing_mm``, then crop/pad to ``target_shape``."""
    if volume.ndim != 3 or volume.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"resample_to_grid: expected a (D, H, W) uint8/uint16 volume, found {volume.shape} {volume.dtype}"
        )
    for name, values in (("spacing_mm", spacing_mm), ("target_spacing_mm", target_spacing_mm)):
        if len(values) != 3 or min(values) <= 0:
            raise ValueError(f"resample_to_grid: {name} should be 3 positive values (dz, dy, dx), found {values!r}")
    if len(target_shape) != 3 or min(target_shape) <= 0:
        raise ValueError(f"resample_to_grid: target_shape should be 3 positive sizes (D, H, W), found {target_shape!r}")

    n_grid = [resampled_size(n, s, t) for n, s, t in zip(volume.shape, spacing_mm, target_spacing_mm)]
    centre_row = retina_centre(volume)
    # The retina's centre on the resampled axial grid (same centre-aligned mapping as _axis_weights, inverted).
    centre_grid = (centre_row + 0.5 - volume.shape[1] / 2) * spacing_mm[1] / target_spacing_mm[1] + n_grid[1] / 2 - 0.5
    offsets = tuple(_window_offset(n_grid[a], target_shape[a], centre_grid + 0.5 if a == 1 else None) for a in range(3))
    axes = [_axis_weights(volume.shape[a], spacing_mm[a], target_spacing_mm[a], n_grid[a], offsets[a], target_shape[a])
            for a in range(3)]

    # B-scan by B-scan, so memory is the input, the output and a few B-scans. Each output B-scan blends two source
    # B-scans; whichever is fewer is resampled in-plane (shrinking axis first): the source B-scans the window needs
    # (each once, cached while still needed) or the blended output B-scans (when the B-scan axis shrinks).
    (d_box, d0, d1, dw), (h_box, *h_axis), (w_box, *w_axis) = axes
    in_plane = sorted(((0, h_axis), (1, w_axis)), key=lambda item: len(item[1][0]) / volume.shape[1 + item[0]])

    def resample_plane(p: np.ndarray) -> np.ndarray:
        for axis, (i0, i1, w1) in in_plane:
            p = _interp_axis(p, axis, i0, i1, w1)
        return p

    blend_first = len(np.union1d(d0, d1)) > len(d0)
    planes: dict[int, np.ndarray] = {}

    def plane(i: int) -> np.ndarray:
        if i not in planes:
            planes[i] = resample_plane(volume[i])
        return planes[i]

    out = np.zeros(tuple(target_shape), dtype=volume.dtype)
    peak = np.iinfo(volume.dtype).max
    total = squares = 0.0  # intensity statistics of the real voxels, accumulated in float64 per B-scan
    for j in range(len(d0)):
        if blend_first:  # first in-plane axis on both source B-scans, blend, then the other axis
            (a0, first), (a1, second) = in_plane
            blended = _interp_axis(volume[d0[j]], a0, *first)
            if dw[j] > 0:
                hi = _interp_axis(volume[d1[j]], a0, *first)
                hi -= blended
                hi *= dw[j]
                blended += hi
            blended = _interp_axis(blended, a1, *second)
        else:
            for stale in [i for i in planes if i < d0[j]]:
                del planes[stale]
            lo, hi = plane(int(d0[j])), plane(int(d1[j]))
            blended = lo * (1.0 - dw[j]) + hi * dw[j]
        np.rint(blended, out=blended)
        np.clip(blended, 0, peak, out=blended)
        out[d_box.start + j, h_box, w_box] = blended
        exact = blended.astype(np.float64)
        total += float(exact.sum())
        squares += float(np.einsum("ij,ij->", exact, exact))  # einsum, not BLAS: no thread pool per B-scan
    real = len(d0) * len(h_axis[0]) * len(w_axis[0])
    mean = total / max(real, 1)
    std = float(np.sqrt(max(squares / max(real, 1) - mean * mean, 0.0)))
    fill = real / out.size
    return Resampled(volume=out, crop_offsets=tuple(int(o) for o in offsets), fill_fraction=float(fill),
                     intensity_mean=mean, intensity_std=std)
