"""AdamW and its per-step schedules (learning rate, weight decay, EMA momentum), all from `OptimConfig`.

Schedules are plain functions of the optimiser step (a python int the loop owns), so the values are known on
the host before the step and setting them never reads anything back from the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from model import momentum_schedule, param_groups
from trainer.config import OptimConfig


def warmup_cosine(step: int, *, start: float, peak: float, final: float, warmup: int, total: int) -> float:
    """Linear start -> peak over `warmup` steps, then a half cosine peak -> final until `total`, then final."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    span = max(total - warmup, 1)
    t = min(step - warmup, span) / span
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_constant_cooldown(
    step: int, *, start: float, peak: float, final: float, warmup: int, cooldown: int, total: int
) -> float:
    """V-JEPA 2's schedule: linear warmup to peak, constant, then a linear cooldown to final over the last
    `cooldown` steps (so a run can be extended by moving the cooldown, without re-running the cosine)."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    cooldown_start = total - cooldown
    if step < cooldown_start or cooldown == 0:
        return peak
    t = min(step - cooldown_start, cooldown) / cooldown
    return peak + (final - peak) * t


_MIN_HORIZON_STEPS = 2.0


def horizon_momentum(step: int, *, start: float, end: float, total: int) -> float:
    """EMA momentum whose averaging horizon is a fraction of the run: 1 - 1/tau, where the horizon tau (in steps)
    grows along a half cosine from ``start * total`` to ``end * total`` steps (then stays), floored at two steps
    (momentum 0.5) for very short runs. Not one step: a momentum of exactly 0 is a special scalar to torch_xla,
    baked into the graph as a constant, so leaving it would compile the EMA update again mid-run.

    The horizon is the EMA's time constant: a weight's share of the target decays as exp(-steps / tau). Set in
    fractions of the run, the target forgets its random init and lags the online encoder by the same share of
    any run, 400 steps or 400k; a fixed momentum (0.996 -> 1.0) does not: after 400 steps of that cosine the
    target still held about 45% of its initial weights.
    """
    t = min(max(step, 0), total) / max(total, 1)
    fraction = start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * t))
    return 1.0 - 1.0 / max(fraction * total, _MIN_HORIZON_STEPS)


def cosine(step: int, *, start: float, end: float, total: int) -> float:
    """Half cosine start -> end over `total` steps (the weight-decay schedule), then end."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedules:
    """lr, weight decay and EMA momentum as functions of the optimiser step over a run of `total_steps`."""

    cfg: OptimConfig
    total_steps: int

    @property
    def warmup_steps(self) -> int:
        return int(round(self.cfg.warmup_fraction * self.total_steps))

    @property
    def cooldown_steps(self) -> int:
        return int(round(self.cfg.cooldown_fraction * self.total_steps))

    def lr(self, step: int) -> float:
        c = self.cfg
        if c.lr_schedule == "wcc":
            return warmup_constant_cooldown(
                step,
                start=c.start_lr,
                peak=c.lr,
                final=c.final_lr,
                warmup=self.warmup_steps,
                cooldown=self.cooldown_steps,
                total=self.total_steps,
            )
        return warmup_cosine(
            step, start=c.start_lr, peak=c.lr, final=c.final_lr, warmup=self.warmup_steps, total=self.total_steps
        )

    def weight_decay(self, step: int) -> float:
        return cosine(step, start=self.cfg.weight_decay, end=self.cfg.final_weight_decay, total=self.total_steps)

    @property
    def momentum(self) -> Callable[[int], float]:
        c = self.cfg
        if c.ema_schedule == "horizon":
            return partial(horizon_momentum, start=c.ema_horizon_start, end=c.ema_horizon_end, total=self.total_steps)
        return momentum_schedule(c.ema_schedule, c.ema_start, c.ema_end, self.total_steps)

    def state(self, step: int) -> dict:
        """What a checkpoint records: the schedule's definition and its values at `step`."""
        return {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "cooldown_steps": self.cooldown_steps,
            "lr": self.lr(step),
            "weight_decay": self.weight_decay(step),
            "momentum": self.momentum(step),
        }


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the EMA target is frozen, so left out), in two groups: decayed
    matrices, and never-decayed biases, norms and mask tokens (tagged so the schedule leaves them at 0).

    `capturable` keeps AdamW's step counter on the device; on XLA the default CPU counter is read back with
    `.item()` inside every step, a host sync that splits the graph."""
    groups = param_groups(model, 1.0)  # 1.0 marks the decayed group whatever weight_decay starts at
    for group in groups:
        group["apply_wd"] = group["weight_decay"] > 0
        group["weight_decay"] = cfg.weight_decay if group["apply_wd"] else 0.0
    return torch.optim.AdamW(groups, lr=cfg.start_lr, betas=cfg.betas, eps=cfg.eps, capturable=capturable)


def set_hparams(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float) -> None:
    """Set this step's lr (every group) and weight decay (decayed groups only)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping) and return the pre-clip global norm as a device tensor (no sync)."""
    return nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
