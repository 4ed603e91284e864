"""Resampling an OCT volume to a fixed physical grid, then cropping or padding it to a fixed shape.

Grid convention: the source's physical extent (``n * spacing`` per axis, voxel-centred) is resampled to
``round(n * spacing / target)`` voxels whose centre coincides with the source's centre. The output window of
``target_shape`` is then placed on that grid: centred on the B-scan and lateral axes, and on the axial axis centred
on the retina (the intensity-weighted centre of the depth profile), clamped so the window never leaves the scan
when the scan is longer and never cuts the scan when it is shorter. Voxels outside the grid are 0 ("padding").

Sampling: the source is the linear interpolation of its voxels (constant beyond the outermost voxel centres).
On an axis that grows or keeps its spacing each output voxel is that interpolant at the voxel's centre. On an axis
that shrinks by ``f`` (target / source spacing > 1) each output voxel is the interpolant's mean over the voxel's
own cell, ``f`` source voxels wide: a box low-pass filter in proportion to the factor (a box of width ``f``
convolved with the linear kernel; area resampling of the interpolant rather than of the voxels, so ramps stay
exact). So OCT speckle averages down (white noise decimated by ``f`` keeps about ``1/sqrt(f)`` of its standard
deviation instead of most of it), the cells tile the axis so a thin layer's integrated intensity does not depend
on where the samples fall, and ramps, the mean and centroids are kept.

Each axis is one sparse (window x source) weight matrix. Only the window's voxels are computed, B-scan by B-scan
in float32: each source B-scan the window needs is filtered in-plane once (the axis that shrinks most first) and
kept while an output B-scan still needs it; each output B-scan is a weighted sum of those. Memory is the input,
the output and a few B-scans; the result is rounded back to the source dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse


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


def _linear_weights(x: np.ndarray, n_src: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps per position: the linear interpolant at ``x`` (source index units, clamped to the outer voxels)."""
    x = np.clip(x, 0.0, n_src - 1)
    i0 = np.floor(x).astype(np.intp)
    w1 = x - i0
    return np.stack([i0, np.minimum(i0 + 1, n_src - 1)], axis=1), np.stack([1.0 - w1, w1], axis=1)


def _hat_integral(u: np.ndarray) -> np.ndarray:
    """Integral of the linear interpolation kernel (the hat on [-1, 1]) from -inf to ``u``."""
    u = np.clip(u, -1.0, 1.0)
    return np.where(u <= 0, (u + 1) ** 2 / 2, 1 - (1 - u) ** 2 / 2)


def _area_weights(x: np.ndarray, n_src: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Taps per position: the mean of the linear interpolant over the cell ``[x - factor/2, x + factor/2]``.

    Within the source's outer voxel centres ``[0, n - 1]`` source voxel ``i`` weighs the integral of its hat over
    the cell; the parts of the cell beyond them (where the interpolant is the edge voxel) weigh on the edge voxel.
    Every row sums to 1 and, the cells tiling the axis, every interior source voxel weighs ``1 / factor`` in all.
    """
    a, b = x - factor / 2, x + factor / 2
    lo, hi = np.clip(a, 0, n_src - 1), np.clip(b, 0, n_src - 1)
    taps = int(np.ceil(factor)) + 2  # hats i = floor(lo) .. ceil(hi) overlap [lo, hi]
    idx = np.floor(lo).astype(np.intp)[:, None] + np.arange(taps)
    w = (_hat_integral(hi[:, None] - idx) - _hat_integral(lo[:, None] - idx)) / factor
    w[:, 0] += np.clip(np.minimum(b, 0) - a, 0, None) / factor  # idx[:, 0] is 0 wherever the cell starts before 0
    last = np.clip(b - np.maximum(a, n_src - 1), 0, None) / factor
    np.add.at(w, (np.arange(len(x)), np.minimum(n_src - 1 - idx[:, 0], taps - 1)), last)
    keep = idx < n_src
    return np.where(keep, idx, n_src - 1), np.where(keep, w, 0.0)


def _axis_matrix(
    n_src: int, spacing: float, target: float, n_grid: int, offset: int, size: int
) -> tuple[slice, sparse.csr_matrix]:
    """For the window's positions on one axis: (valid slice, sparse (positions x source) weights, float32)."""
    k = np.arange(offset, offset + size)
    valid = (k >= 0) & (k < n_grid)
    start = int(np.argmax(valid)) if valid.any() else 0
    stop = start + int(valid.sum())
    k = k[start:stop]
    factor = target / spacing
    # Grid centre == source centre, in source index units (voxel centres at integers).
    x = (k + 0.5 - n_grid / 2) * factor + n_src / 2 - 0.5
    idx, w = _area_weights(x, n_src, factor) if factor > 1 else _linear_weights(x, n_src)
    rows = np.repeat(np.arange(len(k)), idx.shape[1])
    matrix = sparse.csr_matrix((w.ravel().astype(np.float32), (rows, idx.ravel())), shape=(len(k), n_src))
    matrix.eliminate_zeros()  # coincident taps were summed; zero taps would cost a multiply each
    return slice(start, stop), matrix


def _apply(matrix: sparse.csr_matrix, a: np.ndarray, axis: int) -> np.ndarray:
    """``matrix`` applied along ``axis`` of the 2D float32 array ``a`` (float32 result)."""
    return matrix @ a if axis == 0 else (matrix @ a.T).T


# An in-plane filter step: (axis of the B-scan, sparse weights along it).
_PlaneStep = tuple[int, sparse.csr_matrix]


def _filter_plane(plane: np.ndarray, steps: Sequence[_PlaneStep]) -> np.ndarray:
    """``plane`` (H, W) as float32 with ``steps`` applied in order."""
    plane = plane.astype(np.float32, copy=False)
    for axis, matrix in steps:
        plane = _apply(matrix, plane, axis)
    return plane


def _blend_first(d_matrix: sparse.csr_matrix) -> bool:
    """Whether the output B-scans are fewer than the source B-scans they blend (the B-scan axis shrinks): then the
    second in-plane filter costs less applied once per output B-scan, after the blend, than once per source."""
    return len(np.unique(d_matrix.indices)) > d_matrix.shape[0]


def _plane_steps(
    d_matrix: sparse.csr_matrix, h_matrix: sparse.csr_matrix, w_matrix: sparse.csr_matrix
) -> tuple[tuple[_PlaneStep, ...], tuple[_PlaneStep, ...]]:
    """The in-plane filters applied to each source B-scan before the blend, and those applied to each blended
    output B-scan after it. The axis that shrinks most goes first (every later step has less to do)."""
    first, second = (0, h_matrix), (1, w_matrix)
    if w_matrix.shape[0] / w_matrix.shape[1] < h_matrix.shape[0] / h_matrix.shape[1]:
        first, second = second, first
    return ((first,), (second,)) if _blend_first(d_matrix) else ((first, second), ())


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
    # The retina's centre on the resampled axial grid (same centre-aligned mapping as _axis_matrix, inverted).
    centre_grid = (centre_row + 0.5 - volume.shape[1] / 2) * spacing_mm[1] / target_spacing_mm[1] + n_grid[1] / 2 - 0.5
    offsets = tuple(_window_offset(n_grid[a], target_shape[a], centre_grid + 0.5 if a == 1 else None) for a in range(3))
    (d_box, d_matrix), (h_box, h_matrix), (w_box, w_matrix) = [
        _axis_matrix(volume.shape[a], spacing_mm[a], target_spacing_mm[a], n_grid[a], offsets[a], target_shape[a])
        for a in range(3)
    ]

    # B-scan by B-scan, so memory is the input, the output and a few B-scans. Each output B-scan is a weighted sum
    # of source B-scans, each filtered in-plane once and cached while needed, then filtered by what is left.
    before_blend, after_blend = _plane_steps(d_matrix, h_matrix, w_matrix)
    planes: dict[int, np.ndarray] = {}

    out = np.zeros(tuple(target_shape), dtype=volume.dtype)
    peak = np.iinfo(volume.dtype).max
    total = squares = 0.0  # intensity statistics of the real voxels, accumulated in float64 per B-scan
    for j in range(d_matrix.shape[0]):
        row = slice(d_matrix.indptr[j], d_matrix.indptr[j + 1])
        sources, weights = d_matrix.indices[row], d_matrix.data[row]
        for stale in [i for i in planes if i < sources.min()]:
            del planes[stale]
        blended = None
        for i, weight in zip(sources.tolist(), weights.tolist()):
            if i not in planes:
                planes[i] = _filter_plane(volume[i], before_blend)
            term = planes[i] * np.float32(weight)
            blended = term if blended is None else np.add(blended, term, out=blended)
        blended = _filter_plane(blended, after_blend)
        np.rint(blended, out=blended)
        np.clip(blended, 0, peak, out=blended)
        out[d_box.start + j, h_box, w_box] = blended
        exact = blended.astype(np.float64)
        total += float(exact.sum())
        squares += float(np.einsum("ij,ij->", exact, exact))  # einsum, not BLAS: no thread pool per B-scan
    real = d_matrix.shape[0] * h_matrix.shape[0] * w_matrix.shape[0]
    mean = total / max(real, 1)
    std = float(np.sqrt(max(squares / max(real, 1) - mean * mean, 0.0)))
    fill = real / out.size
    return Resampled(
        volume=out,
        crop_offsets=tuple(int(o) for o in offsets),
        fill_fraction=float(fill),
        intensity_mean=mean,
        intensity_std=std,
    )
