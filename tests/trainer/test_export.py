"""encoder.pt carries the encoder the config names (checkpoint.export_encoder: the EMA target or the online
encoder), and a checkpoint yields either of its two encoders on request."""

from __future__ import annotations

import pytest
import torch

from model import SIZES, VJEPA
from shards.typed_config import ConfigError
from tests.trainer.shardset_fixture import SMALL_PREDICTOR
from trainer.checkpoint import (
    CheckpointNotFound,
    CheckpointStore,
    export_encoder,
    load_encoder,
    load_torch,
    torch_bytes,
)
from trainer.config import load_train_config
from trainer.device import build_device
from trainer.optim import Schedules, build_optimizer
from trainer.train_state import RunState, save_checkpoint

TINY = [
    "model.encoder.size=tiny",
    "model.encoder.input_shape=[8,32,32]",
    "model.encoder.patch_size=[4,16,16]",
    "data.crop_shape=[8,32,32]",
    *SMALL_PREDICTOR,
]


def trained_apart(overrides=()):
    """A tiny V-JEPA whose online encoder has moved away from its EMA target."""
    cfg = load_train_config(None, TINY + list(overrides))
    torch.manual_seed(0)
    net = VJEPA(cfg.model)
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(0.5)
    return cfg, net


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("which", ["target", "online"])
def test_the_export_holds_the_encoder_the_config_names(tmp_path, which):
    cfg, net = trained_apart([f"checkpoint.export_encoder={which}"])
    path = str(tmp_path / "encoder.pt")
    export_encoder(path, net, cfg)
    encoder, enc_cfg = load_encoder(path)
    expected, other = (net.encoder, net.target_encoder) if which == "online" else (net.target_encoder, net.encoder)
    assert same_weights(encoder, expected) and not same_weights(encoder, other)
    assert load_encoder(path, which)[0] is not None
    with pytest.raises(CheckpointNotFound, match=f"holds the {which} encoder"):
        load_encoder(path, "online" if which == "target" else "target")


def test_a_checkpoint_gives_either_encoder_and_defaults_to_the_exported_one(tmp_path):
    cfg, net = trained_apart(["checkpoint.export_encoder=online"])
    store = CheckpointStore(str(tmp_path / "ckpt"))
    save_checkpoint(
        store,
        build_device("cpu"),
        net,
        build_optimizer(net, cfg.optim),
        RunState(step=3),
        Schedules(cfg.optim, 10),
        cfg,
    )  # as a run saves it (torch.distributed.checkpoint)
    root = str(tmp_path / "ckpt")
    assert same_weights(load_encoder(root, "target")[0], net.target_encoder)
    assert same_weights(load_encoder(root, "online")[0], net.encoder)
    assert same_weights(load_encoder(root)[0], net.encoder)  # the run exports the online encoder
    with pytest.raises(ValueError, match="encoder kind"):
        load_encoder(root, "predictor")
    with pytest.raises(ConfigError):
        load_train_config(None, TINY + ["checkpoint.export_encoder=ema"])


def test_the_export_carries_the_encoder_width_and_one_saved_with_the_size_alone_still_loads(tmp_path):
    cfg, net = trained_apart(["model.encoder.embed_dim=48", "model.encoder.depth=2", "model.encoder.num_heads=2"])
    export_encoder(str(tmp_path / "narrow.pt"), net, cfg)
    encoder, enc_cfg = load_encoder(str(tmp_path / "narrow.pt"))
    assert (enc_cfg.embed_dim, len(encoder.blocks)) == (48, 2) and same_weights(encoder, net.target_encoder)

    # Exports written before embed_dim, depth and num_heads were keys: `size` alone gives the width.
    cfg, net = trained_apart()
    export_encoder(str(tmp_path / "encoder.pt"), net, cfg)
    payload = load_torch(str(tmp_path / "encoder.pt"))
    for key in ("embed_dim", "depth", "num_heads"):
        del payload["encoder_config"][key]
    (tmp_path / "old.pt").write_bytes(torch_bytes(payload))
    encoder, enc_cfg = load_encoder(str(tmp_path / "old.pt"))
    assert (enc_cfg.embed_dim, enc_cfg.depth, enc_cfg.num_heads) == SIZES["tiny"]
    assert same_weights(encoder, net.target_encoder)
