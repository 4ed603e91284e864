import math

import pytest
import torch

from model import RotaryCache, rope_angles, sincos_table_3d
from model.rope import grid_coords, rope_axis_dim

GRID = (2, 4, 5)


def flat(i_d, i_h, i_w, grid=GRID):
    return (i_d * grid[1] + i_h) * grid[2] + i_w


def test_grid_coords_invert_the_d_major_flat_index():
    idx = torch.tensor([[flat(1, 2, 3), flat(0, 0, 4), flat(1, 3, 0)]])
    assert grid_coords(idx, GRID).tolist() == [[[1, 2, 3], [0, 0, 4], [1, 3, 0]]]


def test_rotary_matches_hand_computed_case_head_dim_6():
    # head_dim 6: one channel pair per axis, frequency 10000^0 = 1, so the angle is the coordinate itself.
    idx = torch.tensor([[flat(1, 2, 3)]])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).view(1, 1, 1, 6)
    out = RotaryCache(rope_angles(idx, GRID, 6)).apply(x).flatten().tolist()
    c1, s1, c2, s2, c3, s3 = math.cos(1), math.sin(1), math.cos(2), math.sin(2), math.cos(3), math.sin(3)
    expected = [1 * c1 - 2 * s1, 1 * s1 + 2 * c1, 3 * c2 - 4 * s2, 3 * s2 + 4 * c2, 5 * c3 - 6 * s3, 5 * s3 + 6 * c3]
    assert out == pytest.approx(expected, abs=1e-6)


def test_rotary_pairs_adjacent_channels_with_one_frequency_each_and_keeps_leftovers():
    # head_dim 14: 4 channels per axis (2 pairs, frequencies 1 and 10000^-1/2 = 0.01), 2 channels not rotated.
    assert rope_axis_dim(14) == 4
    idx = torch.tensor([[flat(0, 3, 0)]])  # only the h axis is non-zero: angle 3 (pair 0) and 0.03 (pair 1)
    x = torch.arange(1.0, 15.0).view(1, 1, 1, 14)
    out = RotaryCache(rope_angles(idx, GRID, 14)).apply(x).flatten()
    expected = x.flatten().clone()
    for (a, b), angle in (((4, 5), 3.0), ((6, 7), 0.03)):
        xa, xb = x.flatten()[a].item(), x.flatten()[b].item()
        expected[a] = xa * math.cos(angle) - xb * math.sin(angle)
        expected[b] = xa * math.sin(angle) + xb * math.cos(angle)
    assert torch.allclose(out, expected, atol=1e-5)

    # Each pair is a rotation: its norm is kept (V-JEPA 2's repeat bug gives a pair two angles and breaks this).
    def pair_norms(t):
        return t[:12].view(6, 2).norm(dim=1)

    assert torch.allclose(pair_norms(out), pair_norms(x.flatten()), atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    head_dim = 64
    q = torch.ones(1, 1, 1, head_dim)  # score = sum over pairs of 2 cos(angle difference), plus the leftovers
    k = torch.ones(1, 1, 1, head_dim)

    def score(pq, pk):
        rq = RotaryCache(rope_angles(torch.tensor([[flat(*pq, grid=(8, 8, 8))]]), (8, 8, 8), head_dim)).apply(q)
        rk = RotaryCache(rope_angles(torch.tensor([[flat(*pk, grid=(8, 8, 8))]]), (8, 8, 8), head_dim)).apply(k)
        return (rq * rk).sum().item()

    base = score((1, 2, 3), (2, 0, 5))
    assert score((4, 5, 1), (5, 3, 3)) == pytest.approx(base, abs=1e-4)
    assert abs(score((1, 2, 3), (2, 0, 6)) - base) > 0.1


def test_sincos_table_has_distinct_rows_for_every_token():
    table = sincos_table_3d(48, GRID)
    assert table.shape == (40, 48)
    assert torch.cdist(table, table).add(torch.eye(40) * 10).min() > 1e-3
    with pytest.raises(ValueError, match="embed_dim"):
        sincos_table_3d(4, GRID)


def test_rotation_backward_is_exact_and_the_real_path_matches_the_complex_one():
    idx = torch.tensor([[3, 17, 38]])
    cache = RotaryCache(rope_angles(idx, GRID, 14))
    x = torch.randn(1, 3, 2, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cache.apply, (x,))
    qkv = torch.randn(1, 3, 3, 2, 14)
    q, k, v = cache.apply_qkv(qkv)
    assert torch.allclose(q, cache.apply(qkv[:, :, 0]), atol=1e-6)
    assert torch.allclose(k, cache.apply(qkv[:, :, 1]), atol=1e-6)
    assert torch.equal(v, qkv[:, :, 2])  # v is not rotated
    # bfloat16 (GPU autocast, TPU) takes the real-arithmetic path.
    bf = cache.apply_qkv(qkv.bfloat16())
    assert all(t.dtype == torch.bfloat16 for t in bf)
    assert all(torch.allclose(a.float(), b, atol=3e-2) for a, b in zip(bf, (q, k, v)))
    # The real-arithmetic path (what XLA runs) agrees with the complex one in fp32.
    from model.rope import _rotate

    t = cache.tables(14)
    assert torch.allclose(_rotate(qkv[:, :, 0], t.cos, t.sin, None), q, atol=1e-6)


@pytest.mark.parametrize("head_dim", [14, 15, 32])
def test_fused_qkv_rotation_gradient_is_exact(head_dim):
    """The fused q/k rotation's backward (one buffer for the qkv gradient) against autograd's numerical check,
    with and without a gradient for every output; an odd head_dim keeps its last channel unrotated."""
    idx = torch.tensor([[3, 17, 38], [0, 5, 39]])
    cache = RotaryCache(rope_angles(idx, GRID, head_dim))
    qkv = torch.randn(2, 3, 3, 2, head_dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cache.apply_qkv(t), (qkv,))
    assert torch.autograd.gradcheck(lambda t: cache.apply_qkv(t)[0], (qkv,))  # no gradient for k and v
    # Rotation by the per-head formula, written out in real arithmetic.
    q, k, v = cache.apply_qkv(qkv.detach())
    assert torch.allclose(q, cache.apply(qkv.detach()[:, :, 0])) and torch.equal(v, qkv.detach()[:, :, 2])
