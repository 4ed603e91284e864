"""Optimizer parameter groups: weight decay on matrices only (V-JEPA 2), never on biases, norms or mask tokens."""

from __future__ import annotations

from torch import nn


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of the trainable parameters that must not be decayed: biases, norm weights (all 1-D) and mask tokens."""
    return {
        name
        for name, p in module.named_parameters()
        if p.requires_grad and (p.ndim <= 1 or name.endswith("bias") or "mask_token" in name)
    }


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters (the EMA target, frozen, is left out)."""
    skip = no_weight_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
