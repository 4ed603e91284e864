"""The resampler on analytic volumes: ramps stay ramps, physical extent and centre are kept, the retina stays in
the axial window, padding is 0 and counted, the source dtype is kept, memory stays near the input's size, and a
shrinking axis is low-pass filtered (noise averages down, a thin layer keeps its intensity whatever the phase)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from beam_jobs import resample
from beam_jobs.resample import resample_to_grid, resampled_size


def _coords(shape, spacing):
    return np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")


def _physical_centroid(volume, spacing, offsets):
    """Centroid in mm of the source's frame, for a window whose start is ``offsets`` on the resampled grid."""
    weights = volume.astype(np.float64)
    idx = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    return [float(((i + o + 0.5) * s * weights).sum() / weights.sum()) for i, o, s in zip(idx, offsets, spacing)]


def test_same_grid_is_the_identity():
    volume = np.random.default_rng(0).integers(0, 65535, size=(5, 17, 9), dtype=np.uint16)
    out = resample_to_grid(volume, (0.1, 0.01, 0.05), (0.1, 0.01, 0.05), volume.shape)
    np.testing.assert_array_equal(out.volume, volume)
    assert out.crop_offsets == (0, 0, 0) and out.fill_fraction == 1.0
    assert out.intensity_mean == pytest.approx(volume.mean()) and out.intensity_std == pytest.approx(volume.std())


@pytest.mark.parametrize("target", [(0.05, 0.02, 0.02), (0.3, 0.004, 0.07)])
def test_a_linear_ramp_stays_a_ramp(target):
    shape, spacing = (24, 300, 120), (0.12, 0.005, 0.03)
    z, y, x = _coords(shape, spacing)
    ramp = (100 * z + 3000 * y + 500 * x + 20).astype(np.float64)
    volume = np.rint(ramp).astype(np.uint16)
    out = resample_to_grid(volume, spacing, target, (8, 64, 48))
    real = out.volume.astype(np.float64)
    # The window lies inside the scan along D and W here: all interior steps equal slope x target spacing.
    for axis, slope in enumerate((100, 3000, 500)):
        steps = np.diff(real, axis=axis)
        inner = tuple(slice(2, -2) for _ in range(3))
        assert np.allclose(steps[inner], slope * target[axis], atol=1.01), axis


def test_physical_extent_and_centre_are_preserved():
    shape, spacing, target = (30, 200, 90), (0.1, 0.005, 0.04), (0.05, 0.02, 0.02)
    z, y, x = _coords(shape, spacing)
    # A bright blob away from the centre, on a zero background (so the axial window centres on it too).
    blob = np.exp(-(((z - 1.0) / 0.3) ** 2 + ((y - 0.6) / 0.05) ** 2 + ((x - 2.2) / 0.3) ** 2)) * 250
    volume = np.rint(blob).astype(np.uint8)
    grid = [resampled_size(n, s, t) for n, s, t in zip(shape, spacing, target)]
    assert grid == [60, 50, 180]  # extent / target spacing: 3.0 / 1.0 / 3.6 mm
    out = resample_to_grid(volume, spacing, target, (80, 64, 200))  # larger than the grid on every axis: all padding
    assert out.fill_fraction == pytest.approx(np.prod(grid) / (80 * 64 * 200))
    assert out.crop_offsets[0] == (60 - 80) // 2 and out.crop_offsets[2] == (180 - 200) // 2
    src = _physical_centroid(volume, spacing, (0, 0, 0))
    dst = _physical_centroid(out.volume, target, out.crop_offsets)
    assert dst == pytest.approx(src, abs=0.02)  # mm
    assert out.volume[out.volume > 0].size > 0 and out.volume[:, :, :10].max() == 0  # padding is 0


def test_bright_layer_stays_in_a_short_axial_window():
    # A deep scan (2 mm) with the retina near the bottom; the window (0.4 mm) is far shorter than the scan.
    shape, spacing = (8, 500, 40), (0.1, 0.004, 0.05)
    volume = np.full(shape, 12, dtype=np.uint8)
    volume[:, 400:430, :] = 220  # the bright layer at 1.6-1.72 mm
    out = resample_to_grid(volume, spacing, (0.1, 0.008, 0.05), (8, 50, 40))
    profile = out.volume.mean(axis=(0, 2))
    assert profile.max() > 200 and 10 < int(np.argmax(profile)) < 40  # inside, near the middle of the window
    assert out.crop_offsets[1] > 0 and out.fill_fraction == 1.0


def test_shorter_scan_is_padded_not_cut():
    volume = np.full((4, 60, 20), 7, dtype=np.uint8)
    out = resample_to_grid(volume, (0.1, 0.01, 0.05), (0.1, 0.01, 0.05), (4, 100, 20))
    assert (out.volume == 7).sum() == volume.size and (out.volume == 0).sum() == 4 * 40 * 20
    assert out.fill_fraction == pytest.approx(0.6) and -40 <= out.crop_offsets[1] <= 0
    assert out.intensity_mean == pytest.approx(7.0) and out.intensity_std == pytest.approx(0.0)


def test_quantised_back_to_the_source_dtype_with_rounding():
    volume = np.zeros((2, 2, 2), dtype=np.uint8)
    volume[:, :, 1] = 3
    out = resample_to_grid(volume, (1.0, 1.0, 1.0), (1.0, 1.0, 0.5), (2, 2, 4))
    assert out.volume.dtype == np.uint8
    # Samples at 0.25 and 0.75 of the way from 0 to 3: 0.75 -> 1 and 2.25 -> 2 (rounded, not truncated).
    np.testing.assert_array_equal(out.volume[0, 0], [0, 1, 2, 3])


def _along(axis: int, n: int, other: tuple[int, int]) -> tuple[int, int, int]:
    """A shape with ``n`` voxels on ``axis`` and ``other`` on the two remaining axes."""
    shape = list(other)
    shape.insert(axis, n)
    return tuple(shape)


def _shrink(shape, axis: int, source_mm: float, factor: float):
    """(spacing, target spacing, whole-grid shape) for shrinking ``axis`` by ``factor``, the others unchanged."""
    spacing = [0.05, 0.05, 0.05]
    spacing[axis] = source_mm
    target = list(spacing)
    target[axis] = source_mm * factor
    return spacing, target, [resampled_size(n, s, t) for n, s, t in zip(shape, spacing, target)]


# 5.17 and 7.7 are what the seed preset does to Spectralis and Topcon rows (3.9 / 2.6 um -> 20 um).
@pytest.mark.parametrize("factor", [5.17, 7.7])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_white_noise_decimated_keeps_the_variance_of_an_average(axis, factor):
    shape = _along(axis, 1200, (6, 24))
    noise = np.random.default_rng(axis).normal(30000, 2000, size=shape)
    volume = np.rint(noise).astype(np.uint16)
    spacing, target, grid = _shrink(shape, axis, 0.004, factor)
    out = resample_to_grid(volume, spacing, target, grid).volume.astype(np.float64)
    inner = [slice(None)] * 3
    inner[axis] = slice(2, -2)  # the outermost cells repeat the edge voxel
    out = out[tuple(inner)]
    # An average of `factor` independent voxels: std / sqrt(factor) (two-tap interpolation keeps ~all of it).
    assert out.std() == pytest.approx(volume.std() / np.sqrt(factor), rel=0.20)
    assert out.mean() == pytest.approx(volume.mean(), abs=0.01 * volume.std())


@pytest.mark.parametrize("factor", [5.0, 7.7])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_thin_layer_keeps_its_integrated_intensity_at_every_sampling_phase(axis, factor):
    """A layer 2 source voxels (8 um) thick, shifted through a whole output voxel in source-voxel steps."""
    shape = _along(axis, 400, (4, 8))
    spacing, target, grid = _shrink(shape, axis, 0.004, factor)
    ratios = []
    for shift in range(int(np.ceil(factor))):
        volume = np.full(shape, 10, dtype=np.uint8)
        layer = [slice(None)] * 3
        layer[axis] = slice(200 + shift, 202 + shift)
        volume[tuple(layer)] = 200
        out = resample_to_grid(volume, spacing, target, grid).volume.astype(np.float64)
        # Integrated intensity above the background, in intensity x mm along the axis.
        ratios.append(((out - 10).sum() * target[axis]) / ((volume - 10.0).sum() * spacing[axis]))
    assert ratios == pytest.approx([1.0] * len(ratios), abs=0.05)


# The B-scan axis shrinks (fewer output B-scans than the sources they blend), then grows.
@pytest.mark.parametrize("target", [(0.3, 0.02, 0.05), (0.05, 0.004, 0.02)])
def test_blending_before_or_after_the_second_in_plane_filter_gives_the_same_volume(target, monkeypatch):
    """The filters are linear, so the order is a matter of cost: the two orders differ only by float32 rounding."""
    volume = np.random.default_rng(3).integers(0, 60000, size=(40, 300, 120), dtype=np.uint16)
    spacing = (0.12, 0.005, 0.03)
    outs = []
    for blend_first in (True, False):
        monkeypatch.setattr(resample, "_blend_first", lambda d_matrix, choice=blend_first: choice)
        outs.append(resample_to_grid(volume, spacing, target, (16, 64, 48)))
    diff = np.abs(outs[0].volume.astype(np.int64) - outs[1].volume.astype(np.int64))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # a sum at a .5 rounding boundary, rarely
    assert outs[0].crop_offsets == outs[1].crop_offsets
    assert outs[0].intensity_mean == pytest.approx(outs[1].intensity_mean, abs=0.01)


def test_memory_stays_within_a_few_times_the_input():
    volume = np.random.default_rng(1).integers(0, 255, size=(64, 500, 256), dtype=np.uint8)
    tracemalloc.start()
    out = resample_to_grid(volume, (0.047, 0.0026, 0.0117), (0.05, 0.0039, 0.0156), (64, 384, 384))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.volume.shape == (64, 384, 384)
    assert peak < 3 * volume.nbytes


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros((2, 2), np.uint8), (1, 1, 1), (1, 1, 1), (2, 2, 2)),
        (np.zeros((2, 2, 2), np.float32), (1, 1, 1), (1, 1, 1), (2, 2, 2)),
        (np.zeros((2, 2, 2), np.uint8), (1, 0, 1), (1, 1, 1), (2, 2, 2)),
        (np.zeros((2, 2, 2), np.uint8), (1, 1, 1), (1, 1, 1), (2, 0, 2)),
    ],
)
def test_bad_arguments_are_rejected(args):
    with pytest.raises(ValueError):
        resample_to_grid(*args)


def test_presets_load_and_the_seed_preset_is_the_default():
    import os

    from beam_jobs.config import PreprocessConfig, load_preprocess_config
    from shards.typed_config import ConfigError

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seed = load_preprocess_config(os.path.join(root, "configs", "preprocess_seed.yaml"))
    assert seed == load_preprocess_config(None) == PreprocessConfig()
    assert seed.target_spacing_mm == (0.05, 0.02, 0.02) and seed.target_shape == (64, 384, 384)
    native = load_preprocess_config(os.path.join(root, "configs", "preprocess_native.yaml"), ["target_shape=[8,16,16]"])
    assert native.target_spacing_mm == (0.094, 0.0039, 0.0156) and native.target_shape == (8, 16, 16)
    # 6 x 1.5 x 6 mm: what the native preset's comment promises.
    window = [round(s * n, 2) for s, n in zip(native.target_spacing_mm, (64, 384, 384))]
    assert window == [6.02, 1.5, 5.99]
    for bad in (["target_shape=[64,384]"], ["target_spacing_mm=[0.05,0,0.02]"], ["resolution=1"]):
        with pytest.raises(ConfigError):
            load_preprocess_config(None, bad)
