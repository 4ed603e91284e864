import math

import pytest
import torch

from model import (
    MaskBlockConfig,
    MaskConfig,
    MultiBlockMasks,
    block_shapes,
    block_union,
    to_volume_mask,
)

GRID = (4, 8, 8)  # the 64 x 128 x 128 volume at patch (16, 16, 16) -> small and fast, 8 x 8 en-face plane
DEFAULT = MaskConfig()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_counts_are_static_across_batches_seeds_and_batch_sizes():
    masks = MultiBlockMasks(GRID, DEFAULT)
    assert len(masks.num_context) == len(masks.num_target) == 2
    n = GRID[0] * GRID[1] * GRID[2]
    shapes = set()
    for seed in range(5):
        for batch in (1, 3):
            for i, (ctx, tgt) in enumerate(masks(batch, gen(seed))):
                assert ctx.dtype == tgt.dtype == torch.int64
                assert ctx.shape == (batch, masks.num_context[i]) and tgt.shape == (batch, masks.num_target[i])
                shapes.add((i, ctx.shape[1], tgt.shape[1]))
    assert len(shapes) == 2
    for kc, kt in zip(masks.num_context, masks.num_target):
        assert kc + kt <= n and kc > 0 and kt > 0
    # The counts come from the config and grid alone: a second generator object agrees.
    assert MultiBlockMasks(GRID, DEFAULT).num_target == masks.num_target


def test_targets_context_and_dropped_partition_the_grid_and_targets_span_all_bscans():
    masks = MultiBlockMasks(GRID, DEFAULT)
    dropped_seen = []
    for ctx, tgt in masks(16, gen(1)):
        for c, t in zip(ctx, tgt):
            assert int(t.min()) >= 0 and int(t.max()) < math.prod(GRID)
            assert bool((c[1:] > c[:-1]).all()) and bool((t[1:] > t[:-1]).all())  # sorted, no repeats
            tv, cv = to_volume_mask(t, GRID), to_volume_mask(c, GRID)
            dropped = ~(tv | cv)
            assert not (tv & cv).any()  # disjoint; the dropped tokens are the rest, so the three cover the grid
            assert int(tv.sum() + cv.sum() + dropped.sum()) == math.prod(GRID)
            assert (tv == tv[:1]).all() and (cv == cv[:1]).all()  # whole columns: every B-scan alike
            dropped_seen.append(int(dropped.sum()))
    assert max(dropped_seen) > 0  # trimmed tokens exist and go to neither set


def test_trimmed_block_tokens_never_become_context():
    # One block per draw: the union is a rectangle. Every target lies in it, so no context column may lie inside
    # the targets' bounding box; before, the block columns cut to reach the target count became context.
    cfg = MaskConfig(blocks=(MaskBlockConfig(1, 0.3, (0.5, 2.0)),))
    masks = MultiBlockMasks(GRID, cfg)
    ((ctx, tgt),) = masks(400, gen(2))
    h, w = GRID[1:]
    trimmed = 0
    for c, t in zip(ctx, tgt):
        t_rows, t_cols = (t % (h * w)) // w, t % w
        c_rows, c_cols = (c % (h * w)) // w, c % w
        inside = (
            (c_rows >= t_rows.min()) & (c_rows <= t_rows.max()) & (c_cols >= t_cols.min()) & (c_cols <= t_cols.max())
        )
        assert not inside.any()
        box = int((t_rows.max() - t_rows.min() + 1) * (t_cols.max() - t_cols.min() + 1))
        trimmed += box > t.numel() // GRID[0]
    assert trimmed > 0  # the check was exercised: some unions were larger than the target count


def test_same_seed_same_masks_and_different_seed_different_masks():
    masks = MultiBlockMasks(GRID, DEFAULT)
    a, b, c = masks(4, gen(7)), masks(4, gen(7)), masks(4, gen(8))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))


@pytest.mark.parametrize(
    "cfg", [MaskBlockConfig(8, 0.15), MaskBlockConfig(2, 0.70), MaskBlockConfig(3, 0.3, (0.5, 2.0))]
)
def test_block_shapes_follow_scale_and_aspect_ratio(cfg):
    plane = (24, 24)
    rows, cols = block_shapes(plane, cfg, 2000, gen(0))
    area = int(24 * 24 * cfg.spatial_scale)
    ratio = rows.double() / cols.double()
    # Rounding each side to an integer moves the area and the ratio by at most one row/column.
    assert ((rows * cols - area).abs() <= rows + cols).all()
    lo, hi = cfg.aspect_ratio
    assert (ratio >= lo * (1 - 2 / cols.double().clamp(min=1)) - 0.2).all()
    assert (ratio <= hi * (1 + 2 / rows.double().clamp(min=1)) + 0.2).all()
    # Log-uniform ratio: both ends of the range are reached.
    assert ratio.min() < lo * 1.15 and ratio.max() > hi / 1.15


def test_block_union_covers_between_one_block_and_all_blocks():
    cfg = MaskBlockConfig(8, 0.15)
    g = gen(3)
    union = block_union((8, 8), cfg, 500, g)
    area = union.sum(dim=(1, 2))
    one_block = int(64 * 0.15)
    assert (area >= one_block - 3).all() and (area <= min(64, 8 * (one_block + 6))).all()
    assert area.float().std() > 0  # positions are random, so is the overlap


def test_fixed_counts_are_low_quantiles_of_the_union_and_its_complement():
    cells = GRID[1] * GRID[2]
    for cfg in DEFAULT.blocks:
        masks = MultiBlockMasks(GRID, MaskConfig(blocks=(cfg,)))
        area = block_union(GRID[1:], cfg, 4000, gen(123)).sum(dim=(1, 2)).double()
        t, c = masks.num_target[0] // GRID[0], masks.num_context[0] // GRID[0]
        # Most draws hold T targets and C context columns (a low quantile of each), so few are drawn again ...
        assert 0.7 < ((area >= t) & (cells - area >= c)).double().mean() < 1.0
        # ... and the counts sit below the typical union and complement, not at their means.
        assert t < area.mean() and c < (cells - area).mean()


def test_configurations_whose_blocks_always_cover_the_plane_are_refused():
    with pytest.raises(ValueError, match="cover the plane"):
        MultiBlockMasks((2, 3, 3), MaskConfig(blocks=(MaskBlockConfig(4, 1.0),)))


def test_no_bias_toward_low_indices():
    # Over many draws each (h, w) column must be a target equally often as its mirror images; a prefix cut to
    # a fixed count (V-JEPA 2's idx[:min_keep]) would starve the bottom rows and last columns.
    masks = MultiBlockMasks(GRID, DEFAULT)
    draws = 3000
    for i, (_, tgt) in enumerate(masks(draws, gen(5))):
        freq = torch.zeros(math.prod(GRID))
        freq.index_add_(0, tgt.flatten(), torch.ones(tgt.numel()))
        freq = (freq / draws).view(GRID)
        assert torch.allclose(freq, freq[:1].expand_as(freq))  # every B-scan alike
        plane = freq[0]
        # binomial std of a frequency over 3000 draws is < 0.01; allow 5 sigma
        assert (plane - plane.flip(0)).abs().max() < 0.05, i
        assert (plane - plane.flip(1)).abs().max() < 0.05, i
        mean_idx = tgt.double().mean().item()
        assert abs(mean_idx - (math.prod(GRID) - 1) / 2) < 0.02 * math.prod(GRID)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="grid"):
        MultiBlockMasks((4, 1, 1), DEFAULT)
    with pytest.raises(ValueError, match="batch_size"):
        MultiBlockMasks(GRID, DEFAULT)(0, gen(0))
    with pytest.raises(ValueError, match="token indices"):
        to_volume_mask(torch.tensor([0, 999]), GRID)
