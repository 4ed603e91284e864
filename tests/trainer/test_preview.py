"""Preview pictures: one row per device domain, exact PNG size, and the mask overlay from a train config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import ContractError
from tests.trainer.shardset_fixture import make_shard_set
from trainer import preview

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")


def row_has_ink(png: str, rows: int) -> list[bool]:
    """Whether each horizontal band of the image holds dark pixels (a drawn panel)."""
    grey = np.asarray(Image.open(png).convert("L"))
    return [bool((band < 100).any()) for band in np.array_split(grey, rows, axis=0)]


@pytest.mark.parametrize(
    "devices",
    [
        ("heidelberg_spectralis", "topcon_triton", "zeiss_cirrus"),
        ("topcon_maestro2", "topcon_maestro2", "zeiss_cirrus"),
    ],
)
def test_preview_has_one_row_per_domain_at_the_expected_size(tmp_path, devices):
    root = str(tmp_path / "set")
    make_shard_set(root, n_train=9, n_val=3, shape=(8, 32, 48), devices=devices)
    out = str(tmp_path / "preview.png")
    assert preview.main(["--shards", root, "--out", out, "--crop-shape", "8", "16", "32"]) == 0
    domains = sorted(set(devices))
    assert Image.open(out).size == preview.png_size(len(domains), preview.DOMAIN_COLUMNS)
    assert all(row_has_ink(out, len(domains)))
    volumes = preview.first_volume_per_device(root)
    assert list(volumes) == domains
    assert all(meta["device"] == d and vol.shape == (8, 32, 48) for d, (vol, meta) in volumes.items())


def test_preview_of_a_resharded_root_has_one_row_per_domain_set(tmp_path):
    from shards import build_root_index, storage

    root = tmp_path / "by_laterality"
    domains = {}
    for name, device in (("L", "zeiss_cirrus"), ("R", "topcon_triton")):
        index = make_shard_set(str(root / name), n_train=2, n_val=1, devices=(device,))
        domains[name] = {"path": name, "by_split": index["counts"]["by_split"]}
    top = build_root_index(by="laterality", domains=domains, config={}, created_by="test")
    storage.write_bytes(str(root / "index.json"), json.dumps(top).encode())
    out = str(tmp_path / "p.png")
    assert preview.main(["--shards", str(root), "--out", out]) == 0
    assert Image.open(out).size == preview.png_size(2, preview.DOMAIN_COLUMNS)
    volumes = preview.first_volume_per_domain(str(root))
    assert {k: m["device"] for k, (_, m) in volumes.items()} == {"L": "zeiss_cirrus", "R": "topcon_triton"}


def test_preview_masks_draw_every_configuration_of_the_train_config(tmp_path):
    from model import MultiBlockMasks
    from trainer.config import load_train_config

    root = str(tmp_path / "set")
    make_shard_set(root, n_train=4, n_val=2, shape=(8, 32, 32))  # smaller than the smoke crop: zero-padded
    out = str(tmp_path / "pv.png")
    assert preview.main(["--shards", root, "--out", out, "--masks", "--config", SMOKE]) == 0
    model_cfg = load_train_config(SMOKE, []).model
    n_configs = len(model_cfg.masks.blocks)
    assert Image.open(preview.masks_path(out)).size == preview.png_size(n_configs, preview.MASK_COLUMNS)
    # The captions carry the static token counts the trainer uses for this config.
    volume, meta = next(iter(preview.first_volume_per_device(root).values()))
    titles = preview.render_masks(volume, meta, model_cfg.encoder, model_cfg.masks, str(tmp_path / "m.png"))
    masks = MultiBlockMasks(model_cfg.encoder.grid, model_cfg.masks)
    for title, n_ctx, n_tgt in zip(titles, masks.num_context, masks.num_target):
        assert f"context {n_ctx}, target {n_tgt} tokens" in title


def test_preview_refuses_an_incomplete_shard_set(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ContractError, match="index.json"):
        preview.main(["--shards", str(tmp_path / "half"), "--out", str(tmp_path / "p.png")])
