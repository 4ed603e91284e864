"""V-JEPA 2 objective on volumes: context encoder + predictor regress an EMA target encoder's features.

Per mask configuration i: encode the context tokens, predict the target tokens with mask token i, and take the
L1 distance to the target encoder's layer-normalised (no affine) features of the full volume at the target
positions; the loss is the mean over configurations (V-JEPA 2, `loss_exp = 1`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.predictor import Predictor
from model.vit import VisionTransformer3D, gather_tokens

MOMENTUM_KINDS = ("cosine", "constant")


def feature_std(x: Tensor) -> Tensor:
    """Collapse indicator: per-dimension std over all tokens of x (..., E), averaged over dimensions.

    Detached and returned as a tensor so the trainer can log it without a host sync."""
    return x.detach().flatten(0, -2).float().std(dim=0).mean()


class VJEPA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer3D(cfg.encoder)
        self.predictor = Predictor(cfg.predictor, cfg.encoder, num_mask_tokens=len(cfg.masks.blocks))
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_encoder.eval()
        self.grid = self.encoder.grid

    def train(self, mode: bool = True) -> VJEPA:
        super().train(mode)
        self.target_encoder.eval()  # the target never drops paths or units
        return self

    @torch.no_grad()
    def target_features(self, x: Tensor) -> Tensor:
        """The target encoder on the full volume, layer-normalised without affine: (B, N, E)."""
        h = self.target_encoder(x)
        return F.layer_norm(h, (h.shape[-1],))

    def encode(self, x: Tensor) -> Tensor:
        """Features for probes and embeddings: the target encoder's layer-normed output (B, N, E)."""
        return self.target_features(x)

    def forward(self, x: Tensor, masks: list[tuple[Tensor, Tensor]], *, features: bool = False) -> dict[str, Tensor]:
        """x (B, 1, D, H, W); masks: one (context_idx (B, Kc), target_idx (B, Kt)) per mask configuration.

        Returns loss (scalar, differentiable), sample_loss (B,) (each sample's loss, detached: every sample has the
        same number of targets, so their mean is the loss), pred_std and target_std (detached scalars). With
        ``features``: also target (B, N, E), the target encoder's layer-normed features, and preds, one
        (B, Kt_i, E) prediction per configuration (for the trainer's collapse diagnostics).
        """
        if len(masks) != self.predictor.mask_tokens.shape[0]:
            raise ValueError(
                f"expected {self.predictor.mask_tokens.shape[0]} (context_idx, target_idx) pairs, one per mask "
                f"configuration, got {len(masks)}"
            )
        target = self.target_features(x)  # (B, N, E), no graph
        tokens = self.encoder.embed(x)  # (B, N, E), shared by every configuration's context
        contexts = [self.encoder.forward_tokens(tokens, ctx) for ctx, _ in masks]  # (B, Kc_i, E) each
        preds = self.predictor.forward_configs([(z, ctx, tgt) for z, (ctx, tgt) in zip(contexts, masks)])
        losses = [(p - gather_tokens(target, tgt)).abs().mean(dim=(1, 2)) for p, (_, tgt) in zip(preds, masks)]
        sample_loss = torch.stack(losses).mean(dim=0)  # (B,): the mean over configurations, per sample
        out = {
            "loss": sample_loss.mean(),
            "sample_loss": sample_loss.detach(),
            "pred_std": torch.stack([feature_std(p) for p in preds]).mean(),
            "target_std": feature_std(target),
        }
        if features:
            out["target"] = target
            out["preds"] = [p.detach() for p in preds]
        return out

    @torch.no_grad()
    def update_target(self, momentum: float | Tensor) -> None:
        """target <- momentum * target + (1 - momentum) * context, one fused foreach lerp over all parameters.

        A tensor momentum keeps the value out of the traced graph (no XLA recompilation when it changes)."""
        target = list(self.target_encoder.parameters())
        online = list(self.encoder.parameters())
        weight = 1.0 - momentum
        torch._foreach_lerp_(target, online, weight)


def momentum_schedule(kind: str, start: float, end: float, total_steps: int) -> Callable[[int], float]:
    """EMA momentum per step. "cosine": start -> end along a half cosine over total_steps (the seed's
    0.996 -> 1.0, as BYOL), then end; "constant": start at every step (V-JEPA 2 uses 0.99925)."""
    if kind not in MOMENTUM_KINDS:
        raise ValueError(f"momentum schedule kind must be one of {MOMENTUM_KINDS}, got {kind!r}")
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"momentum {name} must be in [0, 1], got {value}")
    if total_steps <= 0:
        raise ValueError(f"momentum schedule total_steps must be > 0, got {total_steps}")
    if kind == "constant":
        return lambda step: float(start)

    def cosine(step: int) -> float:
        t = min(max(step, 0), total_steps) / total_steps
        return end - (end - start) * (math.cos(math.pi * t) + 1.0) / 2.0

    return cosine
