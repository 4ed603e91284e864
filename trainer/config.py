"""The training run's typed, closed configuration: the one home for every default of a run.

    from trainer.config import load_train_config
    cfg = load_train_config("configs/smoke.yaml", ["optim.lr=0.0003", "max_steps=20"])

Unknown keys and wrong types raise `shards.typed_config.ConfigError` naming the key; cross-field rules (batch
divisibility, crop shape == model input) are checked by `validate` and raise naming both fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from model.config import ModelConfig
from shards.typed_config import ConfigError, load_yaml
from trainer.data import DataConfig


@dataclass
class OptimConfig:
    lr: float = 1.5e-3  # peak learning rate, reached at the end of warmup
    start_lr: float = 2.0e-4  # learning rate at step 0 (I-JEPA / V-JEPA start_lr)
    final_lr: float = 1.0e-6  # learning rate at the last step
    lr_schedule: Literal["cosine", "wcc"] = "cosine"  # warmup-cosine, or V-JEPA 2's warmup-constant-cooldown
    warmup_fraction: float = 0.1  # fraction of all optimiser steps spent warming up linearly
    cooldown_fraction: float = 0.1  # "wcc" only: fraction of steps of the final linear decay to final_lr
    weight_decay: float = 0.05  # at step 0; biases, norms and mask tokens are never decayed
    final_weight_decay: float = 0.05  # cosine schedule weight_decay -> final_weight_decay (equal = constant)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    # EMA target: "horizon" (the default) sets the EMA's time constant as a fraction of the run's total steps,
    # growing from ema_horizon_start to ema_horizon_end (trainer.optim.horizon_momentum): the target forgets its
    # random init in any run length. For 400 steps: momentum 0.75 -> 0.975; for 100k: 0.999 -> 0.9999 (V-JEPA 2:
    # 0.99925 constant). "cosine" (ema_start -> ema_end, I-JEPA's 0.996 -> 1.0) and "constant" (ema_start) as before.
    ema_schedule: Literal["horizon", "cosine", "constant"] = "horizon"
    ema_horizon_start: float = 0.01  # horizon at step 0, as a fraction of the run's optimiser steps
    ema_horizon_end: float = 0.1  # ... and at the last step
    ema_start: float = 0.996  # "cosine"/"constant": target encoder momentum at step 0
    ema_end: float = 1.0  # "cosine": ... and at the last step

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay", "eps", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup_fraction", "cooldown_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_schedule == "wcc" and self.warmup_fraction + self.cooldown_fraction > 1.0:
            raise ConfigError(
                f"optim.warmup_fraction + optim.cooldown_fraction must be <= 1, got "
                f"{self.warmup_fraction} + {self.cooldown_fraction}"
            )
        for name in ("ema_start", "ema_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("ema_horizon_start", "ema_horizon_end"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"optim.{name} must be in (0, 1] (a fraction of the run), got {getattr(self, name)}")


@dataclass
class CheckpointConfig:
    dir: str = ""  # local directory or gs:// URL; empty = <run_dir>/checkpoints
    every_steps: int = 1000  # also saved at the end of the run; 0 = only at the end
    keep_last: int = 3
    resume: str = ""  # "" = fresh run, "auto" = latest complete checkpoint if any, or a path
    export_encoder: Literal["target", "online"] = "target"  # which encoder <run_dir>/encoder.pt carries

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps between console/metrics.jsonl lines (the only host syncs)
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "octjepa"
    wandb_entity: str = ""
    run_name: str = ""  # empty = the run directory's name
    mask_images: bool = True  # log an input B-scan with its context/target masks at the start

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every must be >= 1, got {self.log_every}")


@dataclass
class ProfileConfig:
    steps: int = 0  # > 0: capture a trace of this many steps into <run_dir>/profile
    start_step: int = 10  # first traced step (after warm-up and compilation)
    port: int = 9012  # XLA: the profiler server's port (for TensorBoard / capture_profile)

    def __post_init__(self) -> None:
        for name in ("steps", "start_step", "port"):
            if getattr(self, name) < 0:
                raise ConfigError(f"profile.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # config.yaml, metrics.jsonl, checkpoints/, encoder.pt, loss_curve.png
    seed: int = 0  # model init, data order and masks
    device: Literal["auto", "cpu", "cuda", "xla"] = "auto"  # auto: xla if PJRT_DEVICE is set, else cuda, else cpu
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # autocast dtype; auto = bf16 on cuda/xla, fp32 on cpu
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimiser steps (schedules span them)
    global_batch_size: int = 128  # samples per optimiser step, summed over hosts and accumulation
    grad_accum: int = 1
    val_every: int = 0  # optimiser steps between validation losses; 0 = never
    # replicated: every device holds all params and optimizer state (DDP under torchrun, SPMD data parallel on
    # XLA); fsdp: params, grads and optimizer state sharded over the devices (FSDP2 under torchrun, SPMD FSDPv2 on XLA)
    sharding: Literal["replicated", "fsdp"] = "replicated"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "global_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "val_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch_size % self.grad_accum:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} must be divisible by grad_accum {self.grad_accum}"
            )
        if tuple(self.data.crop_shape) != tuple(self.model.encoder.input_shape):
            raise ConfigError(
                f"data.crop_shape {tuple(self.data.crop_shape)} must equal model.encoder.input_shape "
                f"{tuple(self.model.encoder.input_shape)}: the encoder sees exactly the loader's crops"
            )

    def host_batch_size(self, host_count: int, local_devices: int = 1) -> int:
        """Samples per host (per torchrun rank) per micro-batch (one forward/backward); it must split evenly over
        the host's `local_devices` (XLA: its chips; the SPMD loader shards each host's batch over them)."""
        micro = self.global_batch_size // self.grad_accum
        if micro % host_count:
            raise ConfigError(
                f"global_batch_size / grad_accum = {micro} must be divisible by the number of hosts {host_count}"
            )
        host = micro // host_count
        if host % local_devices:
            raise ConfigError(
                f"global_batch_size / grad_accum / hosts = {micro} / {host_count} = {host} samples per host must be "
                f"divisible by this host's {local_devices} local devices"
            )
        return host


def load_train_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML preset (None: defaults) plus ``a.b=value`` overrides."""
    return load_yaml(TrainConfig, path, overrides)
