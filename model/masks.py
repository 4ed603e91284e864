"""3D multi-block masks with static token counts, as index tensors (run on the CPU, in the loader).

V-JEPA 2's video blocks span every frame and sit in the (H, W) plane. Here they span every B-scan (the full d
axis) and sit in the (h, w) = axial x lateral plane of the token grid (d, h, w). Per mask configuration, each
sample draws one block shape (area `spatial_scale * h * w`, log-uniform aspect ratio height/width, as V-JEPA 2)
and `num_blocks` uniform positions; the union of the blocks is the target region.

Static shapes. V-JEPA 2 cuts every sample to the batch minimum with a prefix (`idx[:min_keep]`), which changes
the shapes every batch (an XLA recompilation) and always drops the last B-scans and bottom rows. Here the
number of target columns T of a configuration is fixed once from the config and the grid: the mean union area
over 4096 draws from a fixed seed, clipped to [1, h*w - 1]. Each sample then reaches exactly T columns without
positional bias: a random key per column, union columns ranked above all others, top T by key. A union larger
than T loses a uniformly random subset of its columns; a smaller one gains uniformly random extra columns. The
context is the complement (h*w - T columns). Whole columns move, so targets always span all B-scans. So for
every sample, batch and host: targets = d * T tokens, context = d * (h*w - T) tokens.

Indices are flat d-major token indices (index = (i_d * h + i_h) * w + i_w), int64, sorted ascending per row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.config import MaskBlockConfig, MaskConfig

_CALIBRATION_DRAWS = 4096
_CALIBRATION_SEED = 0
_CPU = torch.device("cpu")  # masks are made in the loader, on the CPU, whatever the default device


def block_shapes(
    plane: tuple[int, int], cfg: MaskBlockConfig, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """n block shapes (rows (n,), columns (n,)) on an (h, w) token plane, as V-JEPA 2's `_sample_block_size`."""
    h, w = plane
    area = max(1, int(h * w * cfg.spatial_scale))
    lo, hi = math.log(cfg.aspect_ratio[0]), math.log(cfg.aspect_ratio[1])
    ratio = torch.exp(lo + torch.rand(n, generator=generator, dtype=torch.float64, device=_CPU) * (hi - lo))
    rows = torch.round(torch.sqrt(area * ratio)).long().clamp(1, h)
    cols = torch.round(torch.sqrt(area / ratio)).long().clamp(1, w)
    return rows, cols


def block_union(plane: tuple[int, int], cfg: MaskBlockConfig, n: int, generator: torch.Generator) -> Tensor:
    """n target regions (n, h, w) bool: the union of cfg.num_blocks blocks of one shape at uniform positions."""
    h, w = plane
    rows, cols = block_shapes(plane, cfg, n, generator)
    u = torch.rand(2, n, cfg.num_blocks, generator=generator, dtype=torch.float64, device=_CPU)
    top = (u[0] * (h - rows + 1)[:, None]).long()  # (n, blocks), uniform in [0, h - rows]
    left = (u[1] * (w - cols + 1)[:, None]).long()
    r = torch.arange(h, device=_CPU)
    c = torch.arange(w, device=_CPU)
    in_rows = (r >= top[..., None]) & (r < (top + rows[:, None])[..., None])  # (n, blocks, h)
    in_cols = (c >= left[..., None]) & (c < (left + cols[:, None])[..., None])  # (n, blocks, w)
    return (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)  # (n, h, w)


def fixed_target_columns(plane: tuple[int, int], cfg: MaskBlockConfig) -> int:
    """The static number of target columns: mean union area over a fixed-seed sample, in [1, h*w - 1]."""
    h, w = plane
    gen = torch.Generator(device=_CPU).manual_seed(_CALIBRATION_SEED)
    mean_area = block_union(plane, cfg, _CALIBRATION_DRAWS, gen).sum(dim=(1, 2)).double().mean().item()
    return int(min(max(round(mean_area), 1), h * w - 1))


def _expand_columns(cells: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(B, T) sorted (h, w) cell indices -> (B, d * T) sorted flat token indices of those columns."""
    d, h, w = grid
    depth = torch.arange(d, dtype=torch.long, device=_CPU)[None, :, None] * (h * w)  # (1, d, 1)
    return (depth + cells[:, None, :]).flatten(1)


class MultiBlockMasks:
    """Callable mask generator: `masks(batch_size, generator)` -> [(context_idx, target_idx)] per configuration."""

    def __init__(self, grid: tuple[int, int, int], cfg: MaskConfig) -> None:
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or min(grid) <= 0:
            raise ValueError(f"mask grid must be three positive ints (d, h, w), got {grid}")
        if grid[1] * grid[2] < 2:
            raise ValueError(f"mask grid {grid} needs at least 2 columns to split into context and targets")
        self.grid = grid
        self.cfg = cfg
        self.plane = grid[1:]
        self._target_columns = tuple(fixed_target_columns(self.plane, b) for b in cfg.blocks)
        cells = grid[1] * grid[2]
        self.num_target = tuple(grid[0] * t for t in self._target_columns)
        self.num_context = tuple(grid[0] * (cells - t) for t in self._target_columns)

    def __call__(self, batch_size: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        out = []
        for block_cfg, num_cols in zip(self.cfg.blocks, self._target_columns):
            union = block_union(self.plane, block_cfg, batch_size, generator).flatten(1)  # (B, h*w)
            # Union columns rank above the rest; the random part picks which ones without positional bias.
            key = union.double() + torch.rand(union.shape, generator=generator, dtype=torch.float64, device=_CPU)
            order = torch.argsort(key, dim=1, descending=True)
            target_cells = order[:, :num_cols].sort(dim=1).values
            context_cells = order[:, num_cols:].sort(dim=1).values
            out.append((_expand_columns(context_cells, self.grid), _expand_columns(target_cells, self.grid)))
        return out


def to_volume_mask(idx: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Flat token indices (K,) of one sample -> bool (d, h, w) that is True at those tokens."""
    if idx.ndim != 1:
        raise ValueError(f"to_volume_mask takes the (K,) indices of one sample, got shape {tuple(idx.shape)}")
    n = grid[0] * grid[1] * grid[2]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"token indices must lie in [0, {n}) for grid {tuple(grid)}")
    mask = torch.zeros(n, dtype=torch.bool, device=idx.device)
    mask[idx.long()] = True
    return mask.view(*grid)
