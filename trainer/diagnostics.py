"""Is the run learning, or collapsing? The validation the trainer logs every ``val_every`` steps.

- ``loss``: the V-JEPA loss over every val volume (``trainer.data.iter_full_val``: static padded batches, the
  padding weighted out), not a sample of a few batches.
- ``rank_target`` / ``rank_pred``: the effective rank (RankMe, Garrido et al. 2023: the exponential of the
  entropy of the normalised singular values) of the target encoder's token features and of the predictor's
  outputs, on the first ``data.val_batches`` val batches (the fixed diagnostic set). Layer norm fixes every token's
  variance, so ``target_std`` cannot see a dimensional collapse; the effective rank falls with it.
- ``lookup_loss``: the loss of a per-position lookup table (the mean target feature at each token position over
  every val volume) on the fixed set, beside the model's own loss there (``loss_fixed``): a predictor that does no
  better than the lookup has learned where tokens are, not what the volume holds.

Everything stays on the device until the monitor's step closure reads it (no host sync inside the loop), and
the batches keep static shapes, so a validation compiles a fixed set of XLA graphs once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from model import VJEPA, gather_tokens
from trainer.batch import batch_masks
from trainer.data import real_samples, to_model_input
from trainer.device import Device

RANK_EPS = 1e-7  # RankMe's epsilon on the normalised singular values


def gram_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA); TPUs accumulate in float32. A small singular value is the
    square root of a Gram eigenvalue, so float32 rounding (~1e-7 of the largest) would raise the floor of the
    singular values to ~3e-4 of the largest and add a few percent to the rank of a collapsed representation."""
    return torch.float32 if device.type == "xla" else torch.float64


def effective_rank_from_gram(gram: Tensor) -> Tensor:
    """RankMe of the rows x of a matrix, from its Gram matrix x^T x (E, E): singular values are the square roots
    of its eigenvalues. A Gram matrix can be summed batch by batch, so the rows never need to be kept."""
    eigenvalues = torch.linalg.eigvalsh(gram.to(gram_dtype(gram.device)))
    singular = eigenvalues.clamp_min(0).sqrt()
    p = singular / singular.sum().clamp_min(torch.finfo(singular.dtype).tiny) + RANK_EPS
    return torch.exp(-(p * p.log()).sum()).float()


def effective_rank(x: Tensor) -> Tensor:
    """RankMe of the rows of ``x`` (M, E): between 1 (all rows on one line) and min(M, E)."""
    x = x.flatten(0, -2).to(gram_dtype(x.device))
    return effective_rank_from_gram(x.T @ x)


def _gram(x: Tensor, weight: Tensor) -> Tensor:
    """(B, K, E) features -> the (E, E) Gram matrix of their B*K rows, a padding sample's rows zeroed (zero rows
    add nothing to a Gram)."""
    rows = (x.to(gram_dtype(x.device)) * weight.view(-1, 1, 1).to(gram_dtype(x.device))).flatten(0, 1)
    return rows.T @ rows


@torch.no_grad()
def evaluate(
    model: VJEPA,
    make_batches: Callable[[int | None], Iterable[dict[str, Tensor]]],
    *,
    device: Device,
    fixed_batches: int,
    forward: Callable[..., dict[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """The diagnostics above, as device tensors. ``make_batches(limit)`` yields fresh device batches of every val
    volume (the first ``limit`` batches when given); the first ``fixed_batches`` form the fixed set. ``forward``: the
    module the step calls (DDP / FSDP2 under torchrun; default ``model``). Under torchrun each rank sees its rows of
    every batch: the sums are added over ranks (``device.sum_over_hosts``) before any ratio is taken."""
    forward = forward or model
    total = device.sum_over_hosts
    model.eval()
    embed_dim, tokens = model.cfg.encoder.embed_dim, math.prod(model.grid)
    zeros = lambda *shape: torch.zeros(shape, device=device.torch_device)  # noqa: E731
    loss_sum, weight_sum, fixed_loss, fixed_weight = zeros(), zeros(), zeros(), zeros()
    table = zeros(tokens, embed_dim)  # per-position sum of the target features, then their mean
    gram_target = gram_pred = torch.zeros(
        embed_dim, embed_dim, device=device.torch_device, dtype=gram_dtype(device.torch_device)
    )
    for number, batch in enumerate(make_batches(None)):
        weight = real_samples(batch["scale"])
        with device.autocast():
            out = forward(
                to_model_input(batch["volume"], batch["scale"], batch["shift"]), batch_masks(batch), features=True
            )
        target = out["target"].float()
        loss_sum = loss_sum + (out["sample_loss"].float() * weight).sum()
        weight_sum = weight_sum + weight.sum()
        table = table + (target * weight.view(-1, 1, 1)).sum(dim=0)
        if number < fixed_batches:
            fixed_loss = fixed_loss + (out["sample_loss"].float() * weight).sum()
            fixed_weight = fixed_weight + weight.sum()
            gram_target = gram_target + _gram(target, weight)
            for pred in out["preds"]:
                gram_pred = gram_pred + _gram(pred, weight)
        device.mark_step()
    weight_sum = total(weight_sum)
    table = total(table) / weight_sum.clamp_min(1.0)
    # Second pass over the fixed set only: the table needed every volume first. A wrapped model (DDP, FSDP2 gathers
    # its weights in its forward) runs its whole forward; the model itself just its target encoder.
    lookup_sum = zeros()
    for batch in make_batches(fixed_batches):
        weight = real_samples(batch["scale"])
        x = to_model_input(batch["volume"], batch["scale"], batch["shift"])
        with device.autocast():
            target = (
                model.target_features(x)
                if forward is model
                else forward(x, batch_masks(batch), features=True)["target"]
            ).float()
        per_config = [(gather_tokens(target, tgt) - table[tgt]).abs().mean(dim=(1, 2)) for _, tgt in batch_masks(batch)]
        lookup_sum = lookup_sum + (torch.stack(per_config).mean(dim=0) * weight).sum()
        device.mark_step()
    model.train()
    fixed_weight = total(fixed_weight).clamp_min(1.0)
    return {
        "loss": total(loss_sum) / weight_sum.clamp_min(1.0),
        "loss_fixed": total(fixed_loss) / fixed_weight,
        "lookup_loss": total(lookup_sum) / fixed_weight,
        "rank_target": effective_rank_from_gram(total(gram_target)),
        "rank_pred": effective_rank_from_gram(total(gram_pred)),
    }
