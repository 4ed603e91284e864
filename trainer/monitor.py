"""What a run reports: console progress, `metrics.jsonl`, Weights & Biases, mask images and the loss curve.

Every value arrives as a device tensor inside a step closure (see `trainer.device`), so reading it here is the
only host sync of the loop, and it happens only on logging steps. Only the main host writes anything.

W&B modes come from `logging.wandb`: "disabled" (nothing), "offline" (files under <run_dir>/wandb, no network;
`wandb sync` later), "online". A resumed run continues the same W&B run (its id is kept in the run directory).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from model import to_volume_mask

METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"
MASKS_NAME = "masks_step{step:09d}.png"
_WANDB_ID_NAME = "wandb_run_id.txt"


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Monitor:
    def __init__(
        self,
        *,
        run_dir: str,
        total_steps: int,
        start_step: int,
        global_batch_size: int,
        enabled: bool = True,
        wandb_mode: str = "disabled",
        wandb_project: str = "octjepa",
        wandb_entity: str = "",
        run_name: str = "",
        config: Mapping[str, Any] | None = None,
        extra: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.enabled = enabled
        self.extra = extra
        self.metrics_path = os.path.join(run_dir, METRICS_NAME)
        self._last = (start_step, time.monotonic())
        self.wandb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if wandb_mode != "disabled":
                self.wandb = self._init_wandb(
                    wandb_mode,
                    wandb_project,
                    wandb_entity,
                    run_name or os.path.basename(os.path.abspath(run_dir)),
                    config,
                )

    def _init_wandb(self, mode: str, project: str, entity: str, name: str, config: Mapping | None) -> Any:
        import wandb

        id_path = os.path.join(self.run_dir, _WANDB_ID_NAME)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        return wandb.init(
            project=project,
            entity=entity or None,
            name=name,
            id=run_id,
            resume="allow",
            dir=self.run_dir,
            mode=mode,
            config=dict(config or {}),
        )

    def _write(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {
                    f"{record['split']}/{k}": v
                    for k, v in record.items()
                    if k not in ("step", "split") and isinstance(v, (int, float))
                },
                step=record["step"],
            )

    def log_train(
        self, step: int, epoch: int, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, float]
    ) -> None:
        """One training log line: tensors (loss, pred_std, target_std, grad_norm, skipped) read here."""
        if not self.enabled:
            return
        values = {k: (int(v.sum()) if k == "skipped" else float(v)) for k, v in tensors.items()}
        now = time.monotonic()
        last_step, last_time = self._last
        elapsed = max(now - last_time, 1e-9)
        steps_per_s = (step - last_step) / elapsed
        self._last = (step, now)
        record = {
            "step": step,
            "epoch": epoch,
            "split": "train",
            **values,
            **dict(scalars),
            "samples_per_s": steps_per_s * self.global_batch_size,
            "time": time.time(),
        }
        if self.extra is not None:
            record.update(self.extra())
        self._write(record)
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
        print(
            f"step {step}/{self.total_steps} | epoch {epoch} | loss {values.get('loss', float('nan')):.4f} | "
            f"lr {scalars.get('lr', float('nan')):.3e} | grad {values.get('grad_norm', float('nan')):.3f} | "
            f"{record['samples_per_s']:.1f} samples/s | left {_fmt_duration(eta)}",
            flush=True,
        )

    def log_val(self, step: int, tensors: Mapping[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in tensors.items()}
        self._write({"step": step, "split": "val", **values, "time": time.time()})
        nan = float("nan")
        print(
            f"step {step}/{self.total_steps} | val loss {values.get('loss', nan):.4f} | fixed set: loss "
            f"{values.get('loss_fixed', nan):.4f}, lookup {values.get('lookup_loss', nan):.4f}, effective rank "
            f"target {values.get('rank_target', nan):.1f} pred {values.get('rank_pred', nan):.1f}",
            flush=True,
        )

    def log_mask_image(
        self,
        step: int,
        volume: np.ndarray,
        masks: Sequence[tuple[torch.Tensor, torch.Tensor]],
        grid: tuple[int, int, int],
        patch_size: tuple[int, int, int],
    ) -> str | None:
        """Save (and send to W&B) the middle B-scan of one sample with each configuration's context and target."""
        if not self.enabled:
            return None
        from PIL import Image

        image = mask_panel(volume, masks, grid, patch_size)
        path = os.path.join(self.run_dir, MASKS_NAME.format(step=step))
        Image.fromarray(image).save(path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"masks": wandb.Image(image, caption="B-scan | context (green) / target (red)")}, step=step)
        return path

    def finish(self) -> str | None:
        """Write the loss-curve PNG from metrics.jsonl and close W&B; returns the PNG path."""
        if not self.enabled:
            return None
        path = write_loss_curve(self.metrics_path, os.path.join(self.run_dir, LOSS_CURVE_NAME))
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        return path


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a resumed run's repeated steps keep their last value."""
    by_step = {r["step"]: r[key] for r in records if r.get("split") == split and key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# (split, metric, label, style) of the loss panel, and of the effective-rank panel
LOSS_LINES = (
    ("train", "loss", "train", "-"),
    ("val", "loss", "val (every volume)", ".-"),
    ("val", "loss_fixed", "val, fixed set", ":"),
    ("val", "lookup_loss", "per-position lookup, fixed set", "--"),
)
RANK_LINES = (("val", "rank_target", "target features", ".-"), ("val", "rank_pred", "predictor outputs", ".--"))


def plot_training(axes: Sequence[Any], records: list[dict], *, rank_floor: tuple[float, str] | None = None) -> None:
    """The loss panel (train, val, and the lookup baseline) and the effective-rank panel on two matplotlib axes;
    ``rank_floor`` (value, label) draws a horizontal line (e.g. a quarter of the encoder width)."""
    loss_ax, rank_ax = axes
    for split, key, label, style in LOSS_LINES:
        steps, values = _series(records, split, key)
        if steps:
            loss_ax.plot(steps, values, style, label=label)
    loss_ax.set_xlabel("optimiser step")
    loss_ax.set_ylabel("loss (L1 to target features)")
    loss_ax.set_yscale("log")
    loss_ax.legend(loc="upper right", fontsize=8)
    loss_ax.grid(True, alpha=0.3)
    for split, key, label, style in RANK_LINES:
        steps, values = _series(records, split, key)
        if steps:
            rank_ax.plot(steps, values, style, label=label)
    if rank_floor is not None:
        rank_ax.axhline(rank_floor[0], color="grey", linestyle=":", label=rank_floor[1])
    rank_ax.set_xlabel("optimiser step")
    rank_ax.set_ylabel("effective rank (RankMe), val fixed set")
    rank_ax.set_ylim(bottom=0)
    rank_ax.legend(loc="lower left", fontsize=8)
    rank_ax.grid(True, alpha=0.3)


def write_loss_curve(metrics_path: str, out_path: str) -> str:
    """Train and val loss with the lookup baseline against step, and the effective ranks beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_training(axes, records)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def mask_panel(
    volume: np.ndarray,
    masks: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grid: tuple[int, int, int],
    patch_size: tuple[int, int, int],
) -> np.ndarray:
    """RGB uint8 image: the middle B-scan (H, W) of `volume` (D, H, W), then per mask configuration the same
    B-scan with its context tokens tinted green and its target tokens red. `masks` holds one sample's (K,) indices."""
    d = volume.shape[0] // 2
    bscan = volume[d].astype(np.float32)
    lo, hi = np.percentile(bscan, [1, 99])
    gray = np.clip((bscan - lo) / max(hi - lo, 1e-6), 0, 1)
    token_d = d // patch_size[0]
    panels = [np.repeat(gray[..., None], 3, axis=-1)]
    for context, target in masks:
        rgb = panels[0].copy() * 0.6
        for idx, channel in ((context, 1), (target, 0)):
            plane = to_volume_mask(idx, grid)[token_d].numpy()  # (h, w) tokens of this B-scan
            voxels = np.kron(plane, np.ones(patch_size[1:], dtype=bool))  # (H, W)
            rgb[..., channel] += 0.4 * voxels
        panels.append(rgb)
    gap = np.ones((gray.shape[0], 2, 3), dtype=np.float32)
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    zoom = max(1, 256 // gray.shape[0])  # small smoke crops: enlarge (nearest) so the tokens stay visible
    row = row.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return (np.clip(row, 0, 1) * 255).astype(np.uint8)
