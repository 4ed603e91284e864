import math

import pytest
import torch
import torch.nn.functional as F

from model import (
    VJEPA,
    MultiBlockMasks,
    momentum_schedule,
    no_weight_decay_names,
    param_groups,
)


@pytest.fixture
def setup(tiny_model_cfg):
    cfg = tiny_model_cfg()
    model = VJEPA(cfg)
    masks = MultiBlockMasks(model.grid, cfg.masks)(2, torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 4, 16, 16)
    return model, x, masks


def test_forward_returns_scalars_and_target_is_a_frozen_copy(setup):
    model, x, masks = setup
    out = model(x, masks)
    assert set(out) == {"loss", "sample_loss", "pred_std", "target_std"}
    assert all(out[k].shape == () for k in ("loss", "pred_std", "target_std")) and out["sample_loss"].shape == (2,)
    assert not out["pred_std"].requires_grad and not out["target_std"].requires_grad
    assert not out["sample_loss"].requires_grad
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    for a, b in zip(model.encoder.state_dict().values(), model.target_encoder.state_dict().values()):
        assert torch.equal(a, b)


def test_loss_is_l1_to_layer_normed_target_features_averaged_over_configurations(setup):
    model, x, masks = setup
    with torch.no_grad():
        with torch.no_grad():
            h = model.target_encoder(x)
        h = F.layer_norm(h, (h.shape[-1],))  # no affine
        expected = []
        for i, (ctx, tgt) in enumerate(masks):
            pred = model.predictor(model.encoder(x, ctx), ctx, tgt, mask_index=i)
            target = torch.stack([h[b, tgt[b]] for b in range(x.shape[0])])
            expected.append((pred - target).abs().mean())
        out = model(x, masks, features=True)
    assert torch.allclose(out["loss"], torch.stack(expected).mean(), atol=1e-6)
    assert torch.allclose(out["sample_loss"].mean(), out["loss"], atol=1e-6)
    # Each sample's loss is its own L1: the first sample alone gives the first entry.
    alone = model(x[:1], [(c[:1], t[:1]) for c, t in masks])["loss"]
    assert torch.allclose(out["sample_loss"][0], alone, atol=1e-6)
    assert torch.allclose(out["target"], h, atol=1e-6)
    assert [p.shape for p in out["preds"]] == [(2, t.shape[1], h.shape[-1]) for _, t in masks]
    assert torch.allclose(model.encode(x), h, atol=1e-6)
    assert torch.allclose(out["target_std"], h.flatten(0, 1).std(0).mean(), atol=1e-6)


def test_gradients_reach_encoder_and_predictor_never_the_target(setup):
    model, x, masks = setup
    model(x, masks)["loss"].backward()
    for name, p in list(model.encoder.named_parameters()) + list(model.predictor.named_parameters()):
        assert p.grad is not None, name
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.predictor.mask_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_train_mode_keeps_the_target_in_eval(setup):
    model, _, _ = setup
    model.train()
    assert model.encoder.training and not model.target_encoder.training


@pytest.mark.parametrize("momentum", [0.9, torch.tensor(0.75)])
def test_ema_update_arithmetic(setup, momentum):
    model, _, _ = setup
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(momentum)
    m = float(momentum)
    for t0, t1, c in zip(before, model.target_encoder.parameters(), model.encoder.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * c, atol=1e-6)


def test_momentum_schedules():
    cos = momentum_schedule("cosine", 0.996, 1.0, 100)
    assert cos(0) == pytest.approx(0.996) and cos(100) == pytest.approx(1.0) and cos(1000) == pytest.approx(1.0)
    assert cos(50) == pytest.approx(0.998)
    assert all(cos(s) <= cos(s + 1) for s in range(100))
    const = momentum_schedule("constant", 0.99925, 0.99925, 10)
    assert {const(s) for s in range(20)} == {0.99925}
    with pytest.raises(ValueError, match="kind"):
        momentum_schedule("linear", 0.9, 1.0, 10)
    with pytest.raises(ValueError, match="start"):
        momentum_schedule("cosine", 1.5, 1.0, 10)


def test_param_groups_skip_biases_norms_mask_tokens_and_the_target(setup):
    model, _, _ = setup
    names = no_weight_decay_names(model)
    assert "predictor.mask_tokens" in names
    assert "encoder.blocks.0.attn.qkv.bias" in names and "encoder.norm.weight" in names
    assert "encoder.blocks.0.attn.qkv.weight" not in names
    assert not any(n.startswith("target_encoder") for n in names)
    decay, no_decay = param_groups(model, 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.requires_grad for p in decay["params"])
    assert math.isclose(
        sum(p.numel() for g in (decay, no_decay) for p in g["params"]), sum(p.numel() for p in trainable)
    )


def test_wrong_number_of_mask_pairs_is_rejected(setup):
    model, x, masks = setup
    with pytest.raises(ValueError, match="one per mask"):
        model(x, masks[:1])
