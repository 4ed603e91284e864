"""3D multi-block masks with static token counts, as index tensors (run on the CPU, in the loader).

V-JEPA 2's video blocks span every frame and sit in the (H, W) plane. Here they span every B-scan (the full d
axis) and sit in the (h, w) = axial x lateral plane of the token grid (d, h, w). Per mask configuration, each
sample draws one block shape (area `spatial_scale * h * w`, log-uniform aspect ratio height/width, as V-JEPA 2)
and `num_blocks` uniform positions; the union of the blocks is the target region, its complement the context.

Static shapes, as V-JEPA 2 makes them. V-JEPA 2 cuts every sample's targets and context to the batch minimum
(`idx[:min_keep]`): the cut union tokens are neither predicted nor seen, and the cut changes the shapes every
batch (an XLA recompilation). Here the counts are fixed once from the config and the grid: T target columns =
the `KEEP_QUANTILE` quantile of the union size, C context columns = the same quantile of the complement size,
both over 4096 draws from a fixed seed (about the minimum of a batch of ten). A draw whose union has fewer than
T columns or whose complement has fewer than C is drawn again (V-JEPA 2 likewise redraws an empty context), so
every sample's T targets are a uniformly random subset of its union and its C context columns a uniformly random
subset of its complement: no positional bias, and the remaining columns (`h*w - T - C`, the trimmed blocks and
trimmed context) belong to neither set. Whole columns move, so targets always span all B-scans. For every
sample, batch and host: targets = d * T tokens, context = d * C tokens.

Indices are flat d-major token indices (index = (i_d * h + i_h) * w + i_w), int64, sorted ascending per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from model.config import MaskBlockConfig, MaskConfig

KEEP_QUANTILE = 0.1  # the static counts are this quantile of the union and complement sizes
_CALIBRATION_DRAWS = 4096
_CALIBRATION_SEED = 0
_MIN_ACCEPTANCE = 0.05  # below this, drawing until a union fits would mostly draw
_MAX_REDRAW_ROUNDS = 50
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
    return torch.from_numpy(_block_union(plane, cfg, n, generator))


def _block_union(plane: tuple[int, int], cfg: MaskBlockConfig, n: int, generator: torch.Generator) -> np.ndarray:
    # The draws are torch's (the generator's stream is the contract); the arithmetic on these few small arrays is
    # numpy's, whose per-operation cost is a fraction of torch's: masks are made for every batch, in the loader.
    h, w = plane
    rows, cols = (t.numpy() for t in block_shapes(plane, cfg, n, generator))
    u = torch.rand(2, n, cfg.num_blocks, generator=generator, dtype=torch.float64, device=_CPU).numpy()
    top = (u[0] * (h - rows + 1)[:, None]).astype(np.int64)  # (n, blocks), uniform in [0, h - rows]
    left = (u[1] * (w - cols + 1)[:, None]).astype(np.int64)
    r, c = np.arange(h), np.arange(w)
    in_rows = (r >= top[..., None]) & (r < (top + rows[:, None])[..., None])  # (n, blocks, h)
    in_cols = (c >= left[..., None]) & (c < (left + cols[:, None])[..., None])  # (n, blocks, w)
    # Blocks covering each cell: (n, h, blocks) @ (n, blocks, w), no (n, blocks, h, w) intermediate.
    return np.matmul(in_rows.transpose(0, 2, 1).astype(np.float32), in_cols.astype(np.float32)) > 0


def fixed_counts(plane: tuple[int, int], cfg: MaskBlockConfig) -> tuple[int, int, float]:
    """The static (target columns T, context columns C) of a configuration on an (h, w) plane, and the fraction of
    draws that hold both (union >= T, complement >= C): the quantiles of a fixed-seed sample, T >= 1, C >= 1."""
    h, w = plane
    cells = h * w
    gen = torch.Generator(device=_CPU).manual_seed(_CALIBRATION_SEED)
    union = block_union(plane, cfg, _CALIBRATION_DRAWS, gen).sum(dim=(1, 2)).double()
    q = torch.tensor(KEEP_QUANTILE, dtype=torch.float64)
    targets = int(min(max(int(torch.quantile(union, q, interpolation="lower")), 1), cells - 1))
    context = int(min(max(int(torch.quantile(cells - union, q, interpolation="lower")), 1), cells - targets))
    accepted = ((union >= targets) & (cells - union >= context)).double().mean().item()
    if accepted < _MIN_ACCEPTANCE:
        raise ValueError(
            f"mask configuration {cfg} on a {h} x {w} token plane leaves too few draws with {targets} target and "
            f"{context} context columns ({accepted:.1%}): the blocks nearly always cover the plane; lower "
            "num_blocks or spatial_scale"
        )
    return targets, context, accepted


def _expand_columns(cells: np.ndarray, grid: tuple[int, int, int]) -> Tensor:
    """(B, T) sorted (h, w) cell indices -> (B, d * T) sorted flat token indices of those columns."""
    d, h, w = grid
    depth = np.arange(d, dtype=np.int64)[None, :, None] * (h * w)  # (1, d, 1)
    return torch.from_numpy((depth + cells[:, None, :]).reshape(len(cells), -1))


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the k largest values, ascending (the values are distinct: random keys)."""
    return np.sort(np.argpartition(-values, k - 1, axis=1)[:, :k], axis=1)


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
        counts = [fixed_counts(self.plane, b) for b in cfg.blocks]
        self._columns = tuple((t, c) for t, c, _ in counts)
        self._acceptance = tuple(a for _, _, a in counts)
        self.num_target = tuple(grid[0] * t for t, _ in self._columns)
        self.num_context = tuple(grid[0] * c for _, c in self._columns)

    def _unions(self, index: int, n: int, generator: torch.Generator) -> np.ndarray:
        """n unions (n, h*w) of configuration `index` that hold its T targets and leave its C context columns."""
        block_cfg, (targets, context) = self.cfg.blocks[index], self._columns[index]
        cells = self.plane[0] * self.plane[1]
        kept: list[Tensor] = []
        need = n
        for _ in range(_MAX_REDRAW_ROUNDS):
            draws = math.ceil(need / self._acceptance[index] * 1.25) + 4
            union = _block_union(self.plane, block_cfg, draws, generator).reshape(draws, cells)
            size = union.sum(axis=1)
            union = union[(size >= targets) & (cells - size >= context)][:need]
            kept.append(union)
            need -= union.shape[0]
            if need == 0:
                return np.concatenate(kept)
        raise RuntimeError(
            f"mask configuration {index}: {need} of {n} unions still unfit after "
            f"{_MAX_REDRAW_ROUNDS} rounds of draws (acceptance {self._acceptance[index]:.1%})"
        )

    def __call__(self, batch_size: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        out = []
        for i, (targets, context) in enumerate(self._columns):
            union = self._unions(i, batch_size, generator)  # (B, h*w) bool
            # Random keys pick a uniform subset without positional bias: union columns rank above the rest for
            # the targets, complement columns for the context.
            key = torch.rand(union.shape, generator=generator, dtype=torch.float64, device=_CPU).numpy()
            out.append(
                (
                    _expand_columns(_top(~union + key, context), self.grid),
                    _expand_columns(_top(union + key, targets), self.grid),
                )
            )
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
