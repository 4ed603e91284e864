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

    The rotation tables span the whole head: the pairs past the 3 * P rotated ones turn by angle 0 (cos 1,
    sin 0, an exact copy), so one multiply pass over contiguous memory rotates a head, with no slice and no
    separate copy of the leftover channels.
    """

    def __init__(self, angles: Tensor) -> None:
        angles = angles.float()
        self.cos = angles.cos().unsqueeze(-2)  # (B or 1, K, 1, P): the 1 broadcasts over heads
        self.sin = angles.sin().unsqueeze(-2)
        self._tables: dict[int, _Tables] = {}

    def rows(self, start: int, stop: int) -> RotaryCache:
        """The cache of samples start:stop of a per-sample (B, K) set of positions (itself if shared by all)."""
        if self.cos.shape[0] == 1:
            return self
        sub = RotaryCache.__new__(RotaryCache)
        sub.cos, sub.sin = self.cos[start:stop], self.sin[start:stop]
        sub._tables = {}
        return sub

    def tables(self, head_dim: int) -> _Tables:
        """The full-head tables for `head_dim`, built once and shared by every block of that width."""
        if head_dim not in self._tables:
            self._tables[head_dim] = _Tables(self.cos, self.sin, head_dim)
        return self._tables[head_dim]

    def apply(self, x: Tensor) -> Tensor:
        """Rotate x (B, K, heads, head_dim) into a new tensor; channels past 2 * P are left as they are."""
        return _Rotate.apply(x, self.tables(x.shape[-1]))

    def apply_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, K, heads, head_dim) of a fused (B, K, 3, heads, head_dim) projection, q and k rotated.

        One multiply pass writes the rotated q and k into a fresh buffer; v is returned unrotated (a view of
        qkv where the device allows). The backward writes the gradient of the whole qkv in one pass too: q's
        and k's inverse rotations and v's copy land in their slots of one buffer, with no stack of the three
        gradients followed by a rotation of the stack."""
        return _RotateQK.apply(qkv, self.tables(qkv.shape[-1]))


class _Tables:
    """Rotation tables over the channel pairs of a whole head: (B or 1, K, 1, head_dim // 2) cos, sin and -sin,
    and, where complex multiplication is cheap (CPU, CUDA), the complex cos + i sin and its conjugate."""

    def __init__(self, cos: Tensor, sin: Tensor, head_dim: int) -> None:
        pairs = head_dim // 2
        p = cos.shape[-1]
        if pairs < p:
            raise ValueError(f"head_dim {head_dim} is too small for {p} rotated channel pairs")
        pad = (0, pairs - p)
        self.cos = torch.nn.functional.pad(cos, pad, value=1.0)  # angle 0 past the rotated pairs
        self.sin = torch.nn.functional.pad(sin, pad, value=0.0)
        self.neg_sin = -self.sin
        if cos.device.type in ("cpu", "cuda"):
            self.rot = torch.complex(self.cos, self.sin)
            self.rot_conj = torch.complex(self.cos, self.neg_sin)
        else:  # XLA: real arithmetic
            self.rot = self.rot_conj = None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rot: Tensor | None, out: Tensor | None = None) -> Tensor:
    """Channel pairs of x (..., head_dim) turned by (cos, sin) (..., head_dim // 2), also given as the complex
    rot = cos + i sin, written into `out` (a new contiguous tensor when None, else any same-shape tensor or
    view); an odd last channel is copied."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    r = 2 * cos.shape[-1]
    whole = r == x.shape[-1]
    src, dst = (x, out) if whole else (x[..., :r], out[..., :r])
    if rot is not None and x.dtype in (torch.float32, torch.float64) and _pairs_viewable(src, dst):
        # A pair as one complex number: the rotation is a single multiply pass.
        src_c = torch.view_as_complex(src.unflatten(-1, (-1, 2)))
        dst_c = torch.view_as_complex(dst.unflatten(-1, (-1, 2)))
        torch.mul(src_c, rot if rot.dtype == src_c.dtype else rot.to(src_c.dtype), out=dst_c)
    else:
        # Real arithmetic in fp32 (or fp64): XLA lowers it everywhere, and complex has no bfloat16 form.
        pairs = src.unflatten(-1, (-1, 2))
        pairs = pairs if pairs.dtype == torch.float64 else pairs.float()
        x0, x1 = pairs[..., 0], pairs[..., 1]
        dst.copy_(torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2))
    if not whole:
        out[..., r:] = x[..., r:]
    return out


def _pairs_viewable(*ts: Tensor) -> bool:
    """Whether view_as_complex takes these (..., 2P) tensors: unit last stride, even other strides and offset."""
    return all(
        t.stride(-1) == 1 and t.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in t.stride()[:-1]) for t in ts
    )


class _Rotate(torch.autograd.Function):
    """Rotation of x (B, K, heads, head_dim) whose backward is the inverse rotation (angle negated)."""

    @staticmethod
    def forward(ctx, x: Tensor, tables: _Tables) -> Tensor:
        ctx.tables = tables  # constants (no grad), shared by every block
        return _rotate(x, tables.cos, tables.sin, tables.rot)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        t = ctx.tables
        return _rotate(grad, t.cos, t.neg_sin, t.rot_conj), None


class _RotateQK(torch.autograd.Function):
    """(B, K, 3, heads, head_dim) qkv -> rotated q, rotated k, v, each (B, K, heads, head_dim)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, tables: _Tables) -> tuple[Tensor, Tensor, Tensor]:
        ctx.tables = tables
        cos, sin = tables.cos.unsqueeze(-3), tables.sin.unsqueeze(-3)  # (B or 1, K, 1, 1, pairs): q and k alike
        rot = None if tables.rot is None else tables.rot.unsqueeze(-3)
        qk = _rotate(qkv[:, :, :2], cos, sin, rot)  # (B, K, 2, heads, head_dim), fresh
        v = qkv[:, :, 2]
        if qkv.device.type not in ("cpu", "cuda"):
            v = v.clone()  # XLA: outputs that are fresh tensors, as before
        return qk[:, :, 0], qk[:, :, 1], v

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None) -> tuple[Tensor, None]:
        t = ctx.tables
        ref = next(g for g in (dq, dk, dv) if g is not None)
        B, K, H, D = ref.shape
        dqkv = ref.new_empty((B, K, 3, H, D))
        for i, g in enumerate((dq, dk)):
            if g is None:
                dqkv[:, :, i].zero_()
            else:
                _rotate(g, t.cos, t.neg_sin, t.rot_conj, out=dqkv[:, :, i])
        if dv is None:
            dqkv[:, :, 2].zero_()
        else:
            dqkv[:, :, 2].copy_(dv)
        return dqkv, None


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat((out.sin(), out.cos()), dim=1)  # (M, dim)


def sincos_split(embed_dim: int) -> tuple[int, int, int]:
    """Channels of the sin-cos table given to d, h, w: even thirds, the remainder to w, each half sine, half
    cosine; V-JEPA 2 gives half of them to time, which has no reason to dominate in a volume."""
    third = 2 * (embed_dim // 6)
    dims = (third, third, embed_dim - 2 * third)
    if dims[2] % 2 or third == 0:
        raise ValueError(f"embed_dim {embed_dim} must be even and >= 6 for a 3D sin-cos table")
    return dims


def sincos_table_3d(embed_dim: int, grid: tuple[int, int, int]) -> Tensor:
    """Fixed 3D sin-cos position table (N, embed_dim) in flat d-major token order, split as `sincos_split`."""
    dims = sincos_split(embed_dim)
    n = grid[0] * grid[1] * grid[2]
    coords = grid_coords(torch.arange(n), grid).double()  # (N, 3)
    parts = [_sincos_1d(dims[a], coords[:, a]) for a in range(3)]
    return torch.cat(parts, dim=1).float()
