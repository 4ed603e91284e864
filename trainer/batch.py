"""One batch, from shard to loss: the one definition of what the loader fills and the device layer moves.

The loader's stages (``trainer.stages``) yield a ``Batch``, a plain dict (so it crosses the DataLoader's worker pipe
as one pickled object, its volume in shared memory):

    volume    (B, 1, D, H, W) uint8/uint16  the voxels as stored; normalised and flipped on the device
    scale     (B,) float32                  ``volume * scale + shift`` is the z-scored input, jitter included
    shift     (B,) float32
    flip      (B,) bool                     lateral (W) mirror, applied on the device
    masks     [(context (B, Kc), target (B, Kt)) int64] per mask configuration (training and validation)
    skipped   () int64                      samples dropped as damaged since the previous batch
    keys      [str] * B                     host side only, like the two below
    dropped   [Drop]                        what was dropped (``trainer.stages.Drop``), for the damage budget
    meta      [dict] * B                    evaluation batches only (``trainer.data.iter_eval_batches``)

What goes to the device is ``flatten_batch``'s flat dict of tensors whose first axis is the batch (the form
MpDeviceLoader's per-key sharding takes): the ``DEVICE_RANKS`` keys, then ``context_<i>``/``target_<i>`` per mask
configuration, with ``skipped`` spread over a (B,) vector (the count in slot 0) so it is sharded like everything
else and sums over hosts. ``batch_masks`` reads the pairs back on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypedDict

import torch


class View(NamedTuple):
    """One sample's view, drawn by the loader and applied on the device."""

    key: str
    flip: bool
    scale: float
    shift: float


class Batch(TypedDict, total=False):
    volume: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    flip: torch.Tensor
    masks: list[tuple[torch.Tensor, torch.Tensor]]
    skipped: torch.Tensor
    keys: list[str]
    dropped: list[Any]
    meta: list[dict]


# The keys that cross to the device besides the masks, with their rank (fixes each one's sharding before the first
# batch exists).
DEVICE_RANKS = {"volume": 5, "scale": 1, "shift": 1, "flip": 1, "skipped": 1}


def from_views(volume: torch.Tensor, views: Sequence[View]) -> Batch:
    """A batch of ``volume`` (B, 1, D, H, W) and its samples' views (keys, flips, scales, shifts)."""
    return {
        "volume": volume,
        "scale": torch.tensor([v.scale for v in views], dtype=torch.float32),
        "shift": torch.tensor([v.shift for v in views], dtype=torch.float32),
        "flip": torch.tensor([v.flip for v in views], dtype=torch.bool),
        "keys": [v.key for v in views],
    }


def flatten_batch(batch: Batch) -> dict[str, torch.Tensor]:
    """The loader's batch -> the flat dict of (B, ...) tensors that goes to the device (keys stay on the host)."""
    flat = {key: batch[key] for key in DEVICE_RANKS if key != "skipped"}
    for i, (context, target) in enumerate(batch["masks"]):
        flat[f"context_{i}"] = context
        flat[f"target_{i}"] = target
    skipped = torch.zeros(batch["volume"].shape[0], dtype=torch.int32)
    skipped[0] = int(batch.get("skipped", 0))
    flat["skipped"] = skipped
    return flat


def batch_masks(flat: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (context_idx, target_idx) pairs of a flat batch, in mask-configuration order."""
    count = sum(1 for k in flat if k.startswith("context_"))
    return [(flat[f"context_{i}"], flat[f"target_{i}"]) for i in range(count)]


def batch_ndims(num_masks: int) -> dict[str, int]:
    """Rank of every tensor of a flat batch with ``num_masks`` mask configurations."""
    ndims = dict(DEVICE_RANKS)
    for i in range(num_masks):
        ndims[f"context_{i}"] = ndims[f"target_{i}"] = 2
    return ndims
