"""Optimisation by config: the lr / weight-decay / EMA schedules, weight decay only where it belongs, gradient
clipping, and gradient accumulation equal to one large batch."""

from __future__ import annotations

import math

import pytest
import torch

from model import VJEPA, EncoderConfig, ModelConfig, MultiBlockMasks, PredictorConfig
from shards.typed_config import ConfigError
from trainer.batch import flatten_batch
from trainer.config import OptimConfig, TrainConfig
from trainer.data import DataConfig
from trainer.device import Device
from trainer.optim import (
    Schedules,
    build_optimizer,
    clip_gradients,
    set_hparams,
    warmup_constant_cooldown,
    warmup_cosine,
)
from trainer.train import train_step


def test_warmup_cosine_shape() -> None:
    f = lambda s: warmup_cosine(s, start=0.1, peak=1.0, final=0.01, warmup=10, total=100)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)  # linear warmup
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx((1.0 + 0.01) / 2)  # cosine midpoint
    assert f(100) == pytest.approx(0.01) and f(150) == pytest.approx(0.01)
    after = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_warmup_constant_cooldown_shape() -> None:
    def f(s):
        return warmup_constant_cooldown(s, start=0.0, peak=1.0, final=0.1, warmup=10, cooldown=20, total=100)

    assert f(0) == 0.0 and f(10) == 1.0
    assert {f(s) for s in range(10, 81)} == {1.0}
    assert f(90) == pytest.approx(0.55)  # linear cooldown
    assert f(100) == pytest.approx(0.1)


def test_schedules_from_config() -> None:
    cfg = OptimConfig(
        lr=1e-3,
        start_lr=1e-4,
        final_lr=1e-6,
        warmup_fraction=0.1,
        weight_decay=0.04,
        final_weight_decay=0.4,
        ema_schedule="cosine",
        ema_start=0.996,
        ema_end=1.0,
    )
    s = Schedules(cfg, total_steps=200)
    assert s.warmup_steps == 20
    assert s.lr(0) == pytest.approx(1e-4) and s.lr(20) == pytest.approx(1e-3) and s.lr(200) == pytest.approx(1e-6)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(200) == pytest.approx(0.4)
    assert s.weight_decay(100) == pytest.approx(0.22)
    assert s.momentum(0) == pytest.approx(0.996) and s.momentum(200) == pytest.approx(1.0)
    wcc = Schedules(OptimConfig(lr_schedule="wcc", warmup_fraction=0.1, cooldown_fraction=0.2), 100)
    assert wcc.lr(50) == wcc.lr(79) == pytest.approx(wcc.cfg.lr)


def _init_share(momentum, total: int) -> float:
    """The share of the target's initial weights left after ``total`` EMA updates: prod(momentum(step))."""
    return math.prod(momentum(step) for step in range(total))


def test_default_ema_horizon_spans_the_run_whatever_its_length() -> None:
    cfg = OptimConfig()
    assert cfg.ema_schedule == "horizon"
    for total in (400, 100_000):
        m = Schedules(cfg, total).momentum
        # The EMA's time constant 1 / (1 - m) is 1% of the run at the start and 10% at the end, rising smoothly.
        assert 1 / (1 - m(0)) == pytest.approx(0.01 * total) and 1 / (1 - m(total)) == pytest.approx(0.1 * total)
        values = [m(s) for s in range(0, total + 1, max(1, total // 400))]
        assert all(a <= b for a, b in zip(values, values[1:])) and values[-1] < 1.0
        # The target forgets its random init in a run of any length ...
        assert _init_share(m, total) < 1e-6
    # ... as the old fixed cosine 0.996 -> 1.0 did not in the demo's 400 steps (about 45% of it was left).
    old = Schedules(OptimConfig(ema_schedule="cosine", ema_start=0.996, ema_end=1.0), 400).momentum
    assert 0.4 < _init_share(old, 400) < 0.5
    # Too short a run for the horizon: the floor is two steps (momentum 0.5; XLA would bake an exact 0 into a graph).
    assert Schedules(cfg, 10).momentum(0) == 0.5
    with pytest.raises(ConfigError, match="ema_horizon_end"):
        OptimConfig(ema_horizon_end=0.0)


def test_ema_horizon_schedule_moves_the_target_to_the_online_weights_over_a_run() -> None:
    net = _tiny_model()
    total = 400
    start = [p.clone() for p in net.target_encoder.parameters()]
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(1.0)  # the online encoder moved away from the init, and stays there
    sched = Schedules(OptimConfig(), total)
    for step in range(total):
        net.update_target(torch.tensor(sched.momentum(step)))
    for p0, pt, po in zip(start, net.target_encoder.parameters(), net.encoder.parameters()):
        assert torch.allclose(pt, po, atol=1e-4) and not torch.allclose(pt, p0)


def _tiny_model(drop_path: float = 0.0) -> VJEPA:
    torch.manual_seed(0)
    return VJEPA(
        ModelConfig(
            encoder=EncoderConfig(
                size="tiny",
                embed_dim=32,
                depth=2,
                num_heads=2,
                patch_size=(4, 16, 16),
                input_shape=(8, 32, 32),
                drop_path=drop_path,
            ),
            predictor=PredictorConfig(depth=1, embed_dim=16, num_heads=2),
        )
    )


def test_weight_decay_skips_biases_norms_and_mask_tokens() -> None:
    vjepa = _tiny_model()
    opt = build_optimizer(vjepa, OptimConfig(weight_decay=0.05))
    decayed, plain = opt.param_groups
    names = {id(p): n for n, p in vjepa.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert any("mask_token" in n for n in plain_names)
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert {n for n in plain_names if n.endswith("bias") or "norm" in n} == {
        n for n, p in vjepa.named_parameters() if p.requires_grad and (n.endswith("bias") or "norm" in n)
    }
    target = {id(p) for p in vjepa.target_encoder.parameters()}
    assert not target & {id(p) for g in opt.param_groups for p in g["params"]}  # the EMA target is not optimised

    # One AdamW step with zero gradients: only the weight decay moves anything, and only the decayed group.
    set_hparams(opt, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in vjepa.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in vjepa.named_parameters():
        if n in plain_names or not p.requires_grad:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5)), n


def test_clip_gradients_returns_the_preclip_norm_and_clips() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    assert float(clip_gradients(params, 0.0)) == pytest.approx(5.0)  # 0 = off: norm reported, grads untouched
    assert float(params[1].grad[1]) == 4.0
    assert float(clip_gradients(params, 1.0)) == pytest.approx(5.0)
    total = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert total == pytest.approx(1.0, rel=1e-4)


def _batch(vjepa: VJEPA, rows: slice, volume: torch.Tensor, masks: list) -> dict:
    return flatten_batch(
        {
            "volume": volume[rows],
            "scale": torch.full((volume[rows].shape[0],), 0.05),
            "shift": torch.full((volume[rows].shape[0],), -1.0),
            "flip": torch.zeros(volume[rows].shape[0], dtype=torch.bool),
            "masks": [(c[rows], t[rows]) for c, t in masks],
            "skipped": torch.tensor(0),
        }
    )


def test_gradient_accumulation_equals_one_large_batch() -> None:
    vjepa = _tiny_model()
    volume = torch.randint(0, 255, (4, 1, 8, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    masks = MultiBlockMasks(vjepa.grid, vjepa.cfg.masks)(4, torch.Generator().manual_seed(2))
    results = []
    for accum, batches in (
        (1, [_batch(vjepa, slice(0, 4), volume, masks)]),
        (2, [_batch(vjepa, slice(0, 2), volume, masks), _batch(vjepa, slice(2, 4), volume, masks)]),
    ):
        m = _tiny_model()
        # SGD, lr 1, no decay or clipping: the parameter change is exactly the (accumulated) gradient.
        cfg = TrainConfig(
            global_batch_size=4,
            grad_accum=accum,
            model=m.cfg,
            data=DataConfig(crop_shape=(8, 32, 32)),
            optim=OptimConfig(
                lr=1.0, start_lr=1.0, final_lr=1.0, weight_decay=0.0, final_weight_decay=0.0, clip_grad=0.0
            ),
        )
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        stats = train_step(
            m,
            opt,
            iter(batches),
            device=Device("cpu"),
            cfg=cfg,
            sched=Schedules(cfg.optim, 10),
            step=0,
            params=[p for p in m.parameters() if p.requires_grad],
        )
        results.append((stats, dict(m.named_parameters())))
    (s1, p1), (s2, p2) = results
    assert float(s1["loss"]) == pytest.approx(float(s2["loss"]), rel=1e-5)
    assert float(s1["grad_norm"]) == pytest.approx(float(s2["grad_norm"]), rel=1e-4)
    for name in p1:
        assert torch.allclose(p1[name], p2[name], atol=1e-6), name
