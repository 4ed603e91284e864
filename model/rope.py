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
    """cos and sin of the rotation angles of one set of token positions, computed once per forward and shared
    by every block (V-JEPA 2 recomputes them in each block, for q and for k).

    Channel pair (2j, 2j+1) of a head turns by the angle of pair j: the correct pair interleaving. V-JEPA 2
    keeps a `repeat` of the frequencies that gives the two channels of a pair different angles, for
    checkpoint compatibility only.
    """

    def __init__(self, angles: Tensor) -> None:
        angles = angles.float()
        self.cos = angles.cos().unsqueeze(-2)  # (B or 1, K, 1, P): the 1 broadcasts over heads
        self.sin = angles.sin().unsqueeze(-2)
        self._qkv: tuple[Tensor, Tensor, Tensor] | None = None

    def apply(self, x: Tensor) -> Tensor:
        """Rotate x (B, K, heads, head_dim); channels past 2 * P are left as they are."""
        return _Rotate.apply(x, self.cos, self.sin, _complex(self.cos, self.sin))

    def apply_qkv(self, qkv: Tensor) -> Tensor:
        """Rotate q and k of a fused (B, K, 3, heads, head_dim) projection in one pass; v passes unrotated.

        One multiply over all of qkv (v turned by angle 0) writes q, k, v into a fresh buffer, so the backward
        is one inverse rotation too, with no slice-and-scatter of the gradient."""
        if self._qkv is None:
            cos, sin = self.cos.unsqueeze(2), self.sin.unsqueeze(2)  # (B or 1, K, 1, 1, P)
            cos = torch.cat((cos, cos, torch.ones_like(cos)), dim=2)  # (B or 1, K, 3, 1, P)
            sin = torch.cat((sin, sin, torch.zeros_like(sin)), dim=2)
            self._qkv = (cos, sin, _complex(cos, sin))  # built once, shared by all blocks
        return _Rotate.apply(qkv, *self._qkv)


def _complex(cos: Tensor, sin: Tensor) -> Tensor | None:
    """cos + i sin where complex multiplication is cheap (CPU, CUDA); None elsewhere (XLA: real arithmetic)."""
    return torch.complex(cos, sin) if cos.device.type in ("cpu", "cuda") else None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rot: Tensor | None) -> Tensor:
    """A new tensor: channel pairs of x[..., :2P] turned by (cos, sin) (..., P), also given as the complex
    rot = cos + i sin; the other channels copied."""
    r = 2 * cos.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rot is not None and x.dtype in (torch.float32, torch.float64):
        # A pair as one complex number: the rotation is a single multiply pass.
        src = torch.view_as_complex(x[..., :r].unflatten(-1, (-1, 2)))
        dst = torch.view_as_complex(out[..., :r].unflatten(-1, (-1, 2)))
        torch.mul(src, rot.to(src.dtype), out=dst)
    else:
        # Real arithmetic in fp32: XLA lowers it everywhere, and complex has no bfloat16 form.
        pairs = x[..., :r].unflatten(-1, (-1, 2)).float()
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out[..., :r] = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


class _Rotate(torch.autograd.Function):
    """Rotation whose backward is the inverse rotation (angle negated), saving only cos and sin."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, rot: Tensor | None) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.rot = rot  # a constant (no grad): kept as is, since save_for_backward refuses None
        return _rotate(x, cos, sin, rot)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        rot = None if ctx.rot is None else ctx.rot.conj()
        return _rotate(grad, cos, -sin, rot), None, None, None


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
