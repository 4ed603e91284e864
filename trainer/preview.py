"""Pictures of a shard set to look at before spending a TPU-day on it.

    octjepa preview --shards data/shards --out preview.png
    octjepa preview --shards data/shards --out preview.png --masks --config configs/smoke.yaml
    octjepa preview --shards data/shards_by_device --out preview.png    # a re-sharded root: one row per domain set

``preview.png``: one row per domain (the first volume of each device in a shard set, or of each domain set of a
re-sharded root, whatever field it was split by): the central B-scan, the
en-face mean projection, and the axial profile (mean intensity per row, in mm of the resampled source) with the
window the preprocessing kept shaded and, when a crop shape is known (``--crop-shape`` or ``--config``), the
trainer's centre crop dashed. Captions give the fill fraction and the voxel spacing.
``--masks`` also writes ``preview_masks.png`` (beside ``--out``): one volume, cropped to the encoder's input shape,
with the context (blue) and target (red) tokens of one draw of each mask configuration over its central B-scan,
and the (h, w) token plane of that draw (whole columns span every B-scan, so the plane is the whole mask; the
trimmed tokens, in neither set, stay white).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from shards import (
    ROOT_INDEX_KIND,
    decode_sample,
    iter_shard,
    load_any_index,
    read_index,
    shard_urls,
    storage,
    validate_root_index,
)
from trainer.augment import crop_or_pad, crop_starts

PANEL_INCHES = (3.2, 2.6)  # (width, height) of one panel; the PNG is exactly columns x rows panels at DPI
DPI = 100
DOMAIN_COLUMNS = 3
MASK_COLUMNS = 2


def png_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a montage of rows x columns panels."""
    return round(columns * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def iter_volumes(root: str, index: dict[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Every sample of the set, split by split, shard by shard (decoded and validated by the contract)."""
    for split in sorted(index["splits"]):
        for url in shard_urls(root, index, split):
            with storage.open_url(url, "rb") as f:
                for sample in iter_shard(f, name=url):
                    yield decode_sample(sample)


def first_volume_per_device(root: str) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """{device: (volume, meta)} for every device of the set; reads only until each device has been seen."""
    index = read_index(root)
    wanted = set(index["counts"]["by_device"])
    found: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    for volume, meta in iter_volumes(root, index):
        found.setdefault(meta["device"], (volume, meta))
        if wanted <= set(found):
            break
    if not found:
        raise ValueError(f"{root}: the shard set holds no volumes to preview")
    return dict(sorted(found.items()))


def first_volume_per_domain(root: str) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """{domain: (volume, meta)}: per device for a shard set; per domain set for a re-sharded root."""
    top = load_any_index(root)
    if top.get("kind") != ROOT_INDEX_KIND:
        return first_volume_per_device(root)
    validate_root_index(top, where=root)
    found = {}
    for name, entry in sorted(top["domains"].items()):
        sub = storage.join(root, entry["path"])
        first = next(iter_volumes(sub, read_index(sub)), None)
        if first is not None:  # a domain set may hold no sample of any split
            found[name] = first
    if not found:
        raise ValueError(f"{root}: no domain set of this re-sharded root holds a volume to preview")
    return found


def _figure(rows: int, columns: int) -> tuple[Any, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        rows, columns, squeeze=False, figsize=(columns * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI
    )
    return fig, axes


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # No bbox_inches="tight": the PNG keeps the exact size png_size() promises.
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _grey(ax: Any, image: np.ndarray, title: str, aspect: float) -> None:
    lo, hi = np.percentile(image, (1, 99.5))
    ax.imshow(image, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=aspect, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def render_domains(
    volumes: dict[str, tuple[np.ndarray, dict[str, Any]]], out: str, crop_shape: Sequence[int] | None = None
) -> list[str]:
    """The per-domain montage at ``out``; returns the row titles (one per domain, in order)."""
    fig, axes = _figure(len(volumes), DOMAIN_COLUMNS)
    titles = []
    for row, (device, (volume, meta)) in enumerate(volumes.items()):
        d, h, w = volume.shape
        dz, dy, dx = meta["target_spacing_mm"]
        spacing = f"spacing (dz,dy,dx) {dz:.3g}/{dy:.3g}/{dx:.3g} mm"
        title = f"{device}  fill {meta['fill_fraction']:.2f}"
        titles.append(title)
        # Aspect ratios in mm so a B-scan looks like the retina, not like a stretched array.
        _grey(
            axes[row, 0],
            volume[d // 2].astype(np.float32),
            f"{title}\ncentral B-scan {d // 2}/{d}, {h}x{w}",
            aspect=dy / dx,
        )
        _grey(axes[row, 1], volume.mean(axis=1), f"en-face mean projection\n{spacing}", aspect=dz / dx)
        _axial_profile(axes[row, 2], volume, meta, crop_shape)
    fig.tight_layout(pad=0.4)
    _save(fig, out)
    return titles


def _axial_profile(ax: Any, volume: np.ndarray, meta: dict[str, Any], crop_shape: Sequence[int] | None) -> None:
    """Mean intensity per row along depth, placed in the resampled source's depth; the kept window shaded."""
    h = volume.shape[1]
    dy = meta["target_spacing_mm"][1]
    offset = meta["crop_offsets"][1]
    source_rows = meta["source_shape"][1] * meta["source_spacing_mm"][1] / dy  # source depth in stored rows
    profile = volume.mean(axis=(0, 2))
    depth_mm = (offset + np.arange(h)) * dy
    ax.plot(depth_mm, profile, lw=0.8, color="k")
    ax.axvspan(offset * dy, (offset + h) * dy, color="tab:green", alpha=0.15, label="kept window")
    ax.axvline(0, color="grey", lw=0.6)
    ax.axvline(source_rows * dy, color="grey", lw=0.6)
    if crop_shape is not None:
        start = crop_starts(volume.shape, crop_shape, None)[1]  # the trainer's eval view (centre crop)
        for r in (start, min(start + int(crop_shape[1]), h)):
            ax.axvline((offset + r) * dy, color="tab:orange", ls="--", lw=0.8)
    ax.set_title(f"axial profile: kept rows {offset}..{offset + h} of the source's {source_rows:.0f}", fontsize=7)
    ax.set_xlabel("depth (mm)", fontsize=7)
    ax.tick_params(labelsize=6)


def render_masks(
    volume: np.ndarray, meta: dict[str, Any], encoder_cfg: Any, mask_cfg: Any, out: str, *, seed: int = 0
) -> list[str]:
    """One volume's context/target tokens for one draw of each mask configuration; returns the row titles."""
    import torch
    from matplotlib.colors import ListedColormap

    from model import MultiBlockMasks, to_volume_mask

    d_in, h_in, w_in = encoder_cfg.input_shape
    # What the encoder sees: the trainer's eval view (centre crop, zero-padded where the volume is smaller).
    crop = crop_or_pad(volume, encoder_cfg.input_shape, crop_starts(volume.shape, encoder_cfg.input_shape, None))
    grid = encoder_cfg.grid
    masks = MultiBlockMasks(grid, mask_cfg)(1, torch.Generator().manual_seed(seed))
    fig, axes = _figure(len(masks), MASK_COLUMNS)
    titles = []
    pd, ph, pw = encoder_cfg.patch_size
    bscan = crop[d_in // 2].astype(np.float32)
    for row, ((ctx, tgt), block) in enumerate(zip(masks, mask_cfg.blocks)):
        target = to_volume_mask(tgt[0], grid).numpy()  # (d, h, w) bool
        context = to_volume_mask(ctx[0], grid).numpy()
        dropped = int(np.prod(grid)) - ctx.shape[1] - tgt.shape[1]  # trimmed blocks and context: in neither set
        title = (
            f"{block.num_blocks} blocks x {block.spatial_scale:g}: context {ctx.shape[1]}, "
            f"target {tgt.shape[1]} tokens, neither {dropped}"
        )
        titles.append(title)
        plane_t = target[(d_in // 2) // pd]  # (h, w) tokens of the central B-scan's tubelet
        plane_c = context[(d_in // 2) // pd]
        overlay = np.zeros((h_in, w_in, 4), np.float32)
        overlay[np.kron(plane_c, np.ones((ph, pw), bool))] = (0.1, 0.3, 1.0, 0.25)
        overlay[np.kron(plane_t, np.ones((ph, pw), bool))] = (1.0, 0.1, 0.1, 0.45)
        _grey(axes[row, 0], bscan, f"{title}\n{meta['device']} central B-scan", aspect=1.0)
        axes[row, 0].imshow(overlay, aspect=1.0, interpolation="nearest")
        plane = context.any(axis=0) * 1 + target.any(axis=0) * 2  # (h, w): 0 neither, 1 context, 2 target
        axes[row, 1].imshow(
            plane,
            cmap=ListedColormap(["white", (0.55, 0.65, 1.0), (1.0, 0.2, 0.2)]),
            vmin=0,
            vmax=2,
            interpolation="nearest",
        )
        axes[row, 1].set_title(
            f"(h, w) token plane: target red, context blue, neither white\n(grid {grid}, all {grid[0]} depths)",
            fontsize=7,
        )
        axes[row, 1].set_xticks([])
        axes[row, 1].set_yticks([])
    fig.tight_layout(pad=0.4)
    _save(fig, out)
    return titles


def masks_path(out: str) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}_masks{ext or '.png'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="octjepa preview", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", required=True, help="shard set root (local path or gs://) with index.json")
    parser.add_argument("--out", default="preview.png")
    parser.add_argument("--masks", action="store_true", help="also draw the mask configurations over one volume")
    parser.add_argument(
        "--config", default=None, help="train config YAML for the crop shape and the masks (default: model defaults)"
    )
    parser.add_argument(
        "--crop-shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("D", "H", "W"),
        help="trainer crop to mark on the axial profiles (default: the config's input shape)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask draw")
    args = parser.parse_args(argv)

    model_cfg = None
    if args.config:
        from trainer.config import load_train_config

        model_cfg = load_train_config(args.config, []).model
    elif args.masks:
        from model import ModelConfig

        model_cfg = ModelConfig()
    crop_shape = args.crop_shape or (model_cfg.encoder.input_shape if model_cfg else None)

    volumes = first_volume_per_domain(args.shards)
    titles = render_domains(volumes, args.out, crop_shape)
    print(f"preview: {len(titles)} domains ({', '.join(volumes)}) -> {args.out}")
    if args.masks:
        volume, meta = next(iter(volumes.values()))
        out = masks_path(args.out)
        rows = render_masks(volume, meta, model_cfg.encoder, model_cfg.masks, out, seed=args.seed)
        print(f"masks: {len(rows)} configurations over {meta['key']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
