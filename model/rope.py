"""Positions of tokens on the (d, h, w) grid: 3D rotary embedding and the fixed 3D sin-cos table.

Positions always come from flat token indices (index = (i_d * h + i_h) * w + i_w), so a gathered subset of
tokens (the context, the targets) keeps its true positions whatever order it is in.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grid_coords(token_idx: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(..., K) flat indices -> (..., K, 3) float coordinates (i_d, i_h, i_w)."""
    _, h, w = grid
    i_d = torch.div(token_idx, h * w, rounding_mode="floor")
    i_h = torch.div(token_idx, w, rounding_mode="floor") % h
    i_w = token_idx % w
    return torch.stack((i_d, i_h, i_w), dim=-1).float()


def rope_axis_dim(head_dim: int) -> int:
    """Channels rotated per axis: the head dimension split in three, rounded down to even (as in V-JEPA 2);
    the few channels left over are not rotated."""
    axis_dim = 2 * ((head_dim // 3) // 2)
    if axis_dim == 0:
        raise ValueError(f"head_dim {head_dim} is too small for 3D rotary embedding (needs >= 6)")
    return axis_dim


def rope_angles(token_idx: Tensor, grid: tuple[int, int, int], head_dim: int) -> Tensor:
    """Rotation angles (..., K, 3 * axis_dim / 2) for tokens at `token_idx`.

    Per axis, pair j (channels 2j, 2j+1 of that axis' slice) turns at frequency 10000^(-j / (axis_dim / 2)),
    V-JEPA 2's frequencies; the slices follow in the order d, h, w.
    """
    axis_dim = rope_axis_dim(head_dim)
    half = axis_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32, device=token_idx.device) / half)  # (half,)
    coords = grid_coords(token_idx, grid)  # (..., K, 3)
    return (coords[..., :, None] * omega).flatten(-2)  # (..., K, 3 * half), axis-major


class RotaryCache:
    """cos/sin of the angles for one set of token positions, computed once per forward and shared by every
    block (V-JEPA 2 recomputes them in each block, for q and for k)."""

    def __init__(self, angles: Tensor) -> None:
        # (B or 1, 1, K, P): the 1 broadcasts over heads.
        self.cos = angles.cos().unsqueeze(-3)
        self.sin = angles.sin().unsqueeze(-3)
        self.rotated = 2 * angles.shape[-1]

    def apply(self, x: Tensor) -> Tensor:
        """Rotate channel pairs (2j, 2j+1) of x (B, heads, K, head_dim) by the cached angles.

        The pair interleaving is the correct one: V-JEPA 2 keeps a `repeat` of the frequencies that gives the
        two channels of a pair different angles, for checkpoint compatibility only.
        """
        r = self.rotated
        pairs = x[..., :r].unflatten(-1, (-1, 2))  # (B, heads, K, P, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * self.cos - x1 * self.sin, x0 * self.sin + x1 * self.cos), dim=-1).flatten(-2)
        if r == x.shape[-1]:
            return out
        return torch.cat((out, x[..., r:]), dim=-1)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat((out.sin(), out.cos()), dim=1)  # (M, dim)


def sincos_table_3d(embed_dim: int, grid: tuple[int, int, int]) -> Tensor:
    """Fixed 3D sin-cos position table (N, embed_dim) in flat d-major token order.

    Channels are split in even thirds for d, h, w (the remainder goes to w), each half sine, half cosine;
    V-JEPA 2 gives half of them to time, which has no reason to dominate in a volume.
    """
    third = 2 * (embed_dim // 6)
    dims = (third, third, embed_dim - 2 * third)
    if dims[2] % 2 or third == 0:
        raise ValueError(f"embed_dim {embed_dim} must be even and >= 6 for a 3D sin-cos table")
    n = grid[0] * grid[1] * grid[2]
    coords = grid_coords(torch.arange(n), grid).double()  # (N, 3)
    parts = [_sincos_1d(dims[a], coords[:, a]) for a in range(3)]
    return torch.cat(parts, dim=1).float()
