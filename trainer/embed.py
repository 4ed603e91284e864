"""Frozen-encoder embeddings: every volume of a shard set encoded once, for users' own analyses and for the probe.

    octjepa embed --checkpoint runs/smoke/encoder.pt --shards data/shards --out embeddings.npz [--random-init]

Each volume is encoded by the frozen encoder (centre crop, no augmentation) and its layer-normed tokens are
mean-pooled, as ``VJEPA.encode`` does for V-JEPA 2's frozen evaluation. ``--random-init`` embeds with a randomly
initialised encoder of the same architecture instead (the probe's baseline). ``embed_many`` runs several encoders
over one read of the set, plus the raw-voxel baseline features (``raw_voxel_features``) when asked.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shards import read_index


@dataclass
class Embeddings:
    """One row per volume. ``features`` (V, E) are the pooled embeddings; ``tokens`` (V, N, E) float16 only when
    the attentive probe asked for them."""

    keys: list[str]
    participant_ids: list[str]
    devices: list[str]
    splits: list[str]
    sop_instance_uids: list[str]
    features: np.ndarray
    tokens: np.ndarray | None = None


RAW_POOL = (4, 8, 8)  # the raw-voxel baseline's downsampled grid (D, H, W)


def raw_voxel_features(x: torch.Tensor) -> torch.Tensor:
    """The raw-voxel baseline of a normalised (B, 1, D, H, W) batch: its mean depth profile (H values: where the
    layers are and how bright) and the volume averaged down to ``RAW_POOL`` cells -> (B, H + prod(RAW_POOL))."""
    profile = x.mean(dim=(1, 2, 4))  # (B, H)
    cells = F.adaptive_avg_pool3d(x, RAW_POOL).flatten(1)  # (B, 256)
    return torch.cat([profile, cells], dim=1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def random_init_encoder(cfg: Any, seed: int) -> torch.nn.Module:
    """An encoder of the same architecture with V-JEPA 2's initialisation from a fixed seed (the baseline)."""
    from model import VisionTransformer3D

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = VisionTransformer3D(cfg)
    return encoder.eval()


@torch.no_grad()
def embed_many(
    encoders: dict[str, torch.nn.Module],
    root: str,
    *,
    batch_size: int = 4,
    raw_voxels: str | None = None,
    keep_tokens: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, Embeddings]:
    """Encode every volume of every split of a shard set once per encoder, reading the set once (centre crop to
    the encoders' common input shape); ``raw_voxels`` names an extra entry of ``raw_voxel_features``.
    ``keep_tokens`` also keeps every encoder's tokens (N x E float16 per volume: meant for small sets)."""
    from trainer.data import iter_eval_batches, to_model_input

    if not encoders:
        raise ValueError("embed_many needs at least one encoder")
    shapes = {tuple(e.cfg.input_shape) for e in encoders.values()}
    if len(shapes) != 1:
        raise ValueError(f"the encoders take different input shapes {sorted(shapes)}; embed them separately")
    crop = shapes.pop()
    index = read_index(root)
    rows: dict[str, list[str]] = {
        "keys": [],
        "participant_ids": [],
        "devices": [],
        "splits": [],
        "sop_instance_uids": [],
    }
    names = list(encoders) + ([raw_voxels] if raw_voxels else [])
    features: dict[str, list[np.ndarray]] = {name: [] for name in names}
    tokens: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    modules = {name: e.to(device).eval() for name, e in encoders.items()}
    for split in sorted(index["splits"]):
        for batch in iter_eval_batches(root, split, crop, batch_size):
            x = to_model_input(batch["volume"].to(device), batch["scale"].to(device), batch["shift"].to(device))
            for name, encoder in modules.items():
                h = encoder(x)  # (B, N, E)
                h = F.layer_norm(h, (h.shape[-1],))  # as VJEPA.encode: the features the predictor regressed
                features[name].append(h.mean(dim=1).float().cpu().numpy())
                if keep_tokens:
                    tokens[name].append(h.to(torch.float16).cpu().numpy())
            if raw_voxels:
                features[raw_voxels].append(raw_voxel_features(x).float().cpu().numpy())
            for meta in batch["meta"]:
                for field_name, key in (
                    ("keys", "key"),
                    ("participant_ids", "participant_id"),
                    ("devices", "device"),
                    ("splits", "split"),
                    ("sop_instance_uids", "sop_instance_uid"),
                ):
                    rows[field_name].append(meta[key])
    if not rows["keys"]:
        raise ValueError(f"{root}: the shard set holds no volumes to embed (index splits: {sorted(index['splits'])})")
    return {
        name: Embeddings(
            **rows,
            features=np.concatenate(features[name]),
            tokens=np.concatenate(tokens[name]) if keep_tokens and name in tokens else None,
        )
        for name in names
    }


def embed_shard_set(
    encoder: torch.nn.Module, root: str, *, batch_size: int = 4, device: torch.device | str = "cpu"
) -> Embeddings:
    """Encode every volume of every split of a shard set once (centre crop to the encoder's input shape)."""
    return embed_many({"encoder": encoder}, root, batch_size=batch_size, device=device)["encoder"]


def write_embeddings(emb: Embeddings, out: str) -> list[str]:
    """``out`` (.npz: key, participant_id, device, split, sop_instance_uid, embedding) and a sibling .tsv with the
    same rows; local paths or gs://."""

    from shards import storage

    stem = out.removesuffix(".npz")
    buf = io.BytesIO()
    np.savez(
        buf,
        key=np.array(emb.keys),
        participant_id=np.array(emb.participant_ids),
        device=np.array(emb.devices),
        split=np.array(emb.splits),
        sop_instance_uid=np.array(emb.sop_instance_uids),
        embedding=emb.features,
    )
    storage.write_bytes(stem + ".npz", buf.getvalue())
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(
        ["key", "participant_id", "device", "split", "sop_instance_uid"]
        + [f"e{i}" for i in range(emb.features.shape[1])]
    )
    for i, key in enumerate(emb.keys):
        writer.writerow(
            [key, emb.participant_ids[i], emb.devices[i], emb.splits[i], emb.sop_instance_uids[i]]
            + [f"{v:.6g}" for v in emb.features[i]]
        )
    storage.write_bytes(stem + ".tsv", text.getvalue().encode("utf-8"))
    return [stem + ".npz", stem + ".tsv"]


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="encoder.pt export or a checkpoint (directory)")
    parser.add_argument("--shards", required=True, help="shard set root (local path or gs://) with index.json")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init encoder and of the probes")


def main_embed(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="octjepa embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common_args(parser)
    parser.add_argument("--out", required=True, help="output .npz (a .tsv with the same rows is written beside it)")
    parser.add_argument("--random-init", action="store_true", help="embed with a random-init encoder instead")
    args = parser.parse_args(argv)
    from trainer.checkpoint import load_encoder

    encoder, cfg = load_encoder(args.checkpoint)
    if args.random_init:
        encoder = random_init_encoder(cfg, args.seed)
    emb = embed_shard_set(encoder, args.shards, batch_size=args.batch_size, device=pick_device(args.device))
    paths = write_embeddings(emb, args.out)
    print(f"embedded {len(emb.keys)} volumes ({emb.features.shape[1]} dims) -> {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main_embed())
