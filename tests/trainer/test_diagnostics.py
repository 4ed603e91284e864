"""The trainer's collapse diagnostics: the effective rank on matrices of known rank, the full validation set in
static padded batches, and the weighted val loss / lookup baseline against a brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import model.config
from model import VJEPA, EncoderConfig, ModelConfig, MultiBlockMasks, PredictorConfig
from tests.trainer.shardset_fixture import make_shard_set
from trainer.data import DataConfig, full_val_batches, iter_full_val, real_samples, to_model_input
from trainer.device import Device
from trainer.diagnostics import effective_rank, effective_rank_from_gram, evaluate


def test_effective_rank_of_known_matrices():
    rng = np.random.default_rng(0)
    e = 24
    assert effective_rank(torch.eye(e)).item() == pytest.approx(e, rel=1e-4)  # equal singular values: full rank
    for k in (1, 3, 10):  # k equal singular values, any orthonormal frame, any number of rows
        q, _ = np.linalg.qr(rng.normal(size=(e, e)))
        x = torch.tensor(np.diag([5.0] * k + [0.0] * (e - k)) @ q.T, dtype=torch.float32)
        assert effective_rank(x).item() == pytest.approx(k, rel=1e-3)
        assert effective_rank(torch.cat([x, torch.zeros(7, e)])).item() == pytest.approx(k, rel=1e-3)  # zero rows
    one_line = torch.tensor(rng.normal(size=(100, 1)) @ rng.normal(size=(1, e)), dtype=torch.float32)
    assert effective_rank(one_line).item() == pytest.approx(1.0, abs=1e-3)
    # Two singular values in ratio 3:1: exp(entropy of (0.75, 0.25)).
    x = torch.zeros(2, e)
    x[0, 0], x[1, 1] = 3.0, 1.0
    assert effective_rank(x).item() == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-4
    )
    # The Gram route agrees with the singular values of the rows themselves.
    x = torch.tensor(rng.normal(size=(300, e)) * np.linspace(0.1, 3.0, e), dtype=torch.float32)
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum() + 1e-7
    assert effective_rank_from_gram(x.T @ x).item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-4)


@pytest.mark.parametrize("host_count", [1, 2])
def test_full_val_holds_every_val_volume_once_in_static_padded_batches(tmp_path, host_count):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=8, n_val=11, val_samples_per_shard=[4, 4, 3])
    cfg = DataConfig(shards=root, crop_shape=(8, 32, 32))
    masks = MultiBlockMasks((2, 2, 2), model.config.MaskConfig())
    total = full_val_batches(index, cfg, 3, host_count)
    assert total == (4 if host_count == 1 else 3)  # 11 volumes; two hosts hold 7 and 4 of them
    keys, levels = [], []
    for host in range(host_count):
        batches = list(
            iter_full_val(cfg, index=index, batch_size=3, masks=masks, seed=0, host_index=host, host_count=host_count)
        )
        assert len(batches) == total  # every host runs the same number of steps
        for batch in batches:
            assert batch["volume"].shape == (3, 1, 8, 32, 32) and len(batch["masks"]) == 2
            weight = real_samples(batch["scale"])
            pad = weight == 0
            assert (batch["volume"][pad] == 0).all() and (batch["shift"][pad] == 0).all()
            keys += [k for k, w in zip(batch["keys"], weight) if w]
            levels += [int(v.float().mean()) for v, w in zip(batch["volume"], weight) if w]
        again = list(
            iter_full_val(
                cfg, index=index, batch_size=3, masks=masks, seed=0, host_index=host, host_count=host_count, limit=1
            )
        )
        assert len(again) == 1 and torch.equal(again[0]["masks"][0][1], batches[0]["masks"][0][1])  # fixed masks
    assert len(keys) == len(set(keys)) == 11
    assert sorted(levels) == [n + 20 + 3 for n in range(11)]  # sample n's level is n + 20, plus noise mean 3.5


def _tiny_model() -> VJEPA:
    torch.manual_seed(0)
    encoder = EncoderConfig(
        size="tiny", embed_dim=32, depth=2, num_heads=2, patch_size=(4, 16, 16), input_shape=(8, 32, 32)
    )
    return VJEPA(ModelConfig(encoder=encoder, predictor=PredictorConfig(depth=1, embed_dim=16, num_heads=2)))


def test_evaluate_weights_out_padding_and_matches_a_brute_force_computation(tmp_path):
    root = str(tmp_path / "set")
    index = make_shard_set(root, n_train=8, n_val=7, val_samples_per_shard=[4, 3])
    cfg = DataConfig(shards=root, crop_shape=(8, 32, 32))
    net = _tiny_model()
    masks = MultiBlockMasks(net.grid, net.cfg.masks)
    device = Device("cpu", "fp32")

    def make_batches(limit, batch_size=3):
        loader = iter_full_val(
            cfg, index=index, batch_size=batch_size, masks=masks, seed=0, host_index=0, host_count=1, limit=limit
        )
        return device.wrap_loader(loader, 2)

    out = evaluate(net, make_batches, device=device, fixed_batches=2)
    assert set(out) == {"loss", "loss_fixed", "lookup_loss", "rank_target", "rank_pred"}
    assert net.training  # left in training mode

    # Brute force on the real samples alone (7 volumes, 3 batches of 3, two padding rows in the last).
    batches = list(make_batches(None))
    real = [(b, i) for b in batches for i in range(3) if b["scale"][i] != 0]
    assert len(real) == 7
    net.eval()
    with torch.no_grad():
        per_sample, targets = [], []
        for b, i in real:
            x = to_model_input(b["volume"][i : i + 1], b["scale"][i : i + 1], b["shift"][i : i + 1])
            m = [(b[f"context_{k}"][i : i + 1], b[f"target_{k}"][i : i + 1]) for k in range(2)]
            per_sample.append(net(x, m)["loss"])
            targets.append((net.target_features(x)[0], m))
    table = torch.stack([t for t, _ in targets]).mean(0)  # (N, E): per-position mean over the 7 volumes
    lookup = [torch.stack([(t[tgt[0]] - table[tgt[0]]).abs().mean() for _, tgt in m]).mean() for t, m in targets[:6]]
    assert out["loss"].item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)
    assert out["loss_fixed"].item() == pytest.approx(torch.stack(per_sample[:6]).mean().item(), rel=1e-5)
    assert out["lookup_loss"].item() == pytest.approx(torch.stack(lookup).mean().item(), rel=1e-5)
    fixed_tokens = torch.cat([t for t, _ in targets[:6]])
    assert out["rank_target"].item() == pytest.approx(effective_rank(fixed_tokens).item(), rel=1e-4)
    assert 1.0 < out["rank_target"].item() <= 32
    # Counted as samples, the two padding rows would move the mean.
    last = batches[-1]
    with torch.no_grad():
        padded = net(
            to_model_input(last["volume"], last["scale"], last["shift"]),
            [(last[f"context_{k}"], last[f"target_{k}"]) for k in range(2)],
        )["sample_loss"]
    unweighted = (torch.stack(per_sample).sum() + padded[1:].sum()) / 9
    assert unweighted.item() != pytest.approx(out["loss"].item(), rel=1e-3)
