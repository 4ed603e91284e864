"""Pretrain V-JEPA 2 3D on a shard set, on the CPU, one CUDA GPU, or a TPU pod (torch_xla SPMD).

    octjepa train --config configs/smoke.yaml
    python -m trainer.train --config configs/smoke.yaml run_dir=runs/try max_steps=50 optim.lr=0.0003
    octjepa train --config configs/pretrain_vjepa_multi_domain.yaml --resume auto    # continue the latest checkpoint

Writes <run_dir>/config.yaml (the resolved config), metrics.jsonl, checkpoints/ (or checkpoint.dir, may be gs://),
encoder.pt (the encoder `checkpoint.export_encoder` names, see `trainer.checkpoint.load_encoder`), loss_curve.png
and a mask image.

The step is XLA-clean: static shapes (mask sizes come from the config), hyperparameters computed on the host from
the step number, metrics read only in step closures on logging steps.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Iterable, Iterator, Sequence

import torch
import yaml

from model import VJEPA, MultiBlockMasks
from shards import read_index, storage
from shards.typed_config import ConfigError, to_dict
from trainer.checkpoint import CheckpointStore, export_encoder, load_checkpoint, resolve_resume
from trainer.config import TrainConfig, load_train_config
from trainer.data import build_train_loader, iter_full_val, steps_per_epoch, to_model_input
from trainer.device import Device, batch_masks, build_device
from trainer.diagnostics import evaluate
from trainer.monitor import Monitor
from trainer.optim import Schedules, build_optimizer, clip_gradients, set_hparams

ENCODER_NAME = "encoder.pt"
CONFIG_NAME = "config.yaml"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="octjepa train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/smoke.yaml")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint, if any) or a checkpoint path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.0003 max_steps=100")
    return p.parse_args(argv)


@dataclass
class RunState:
    """Where the run is: optimiser steps done, the epoch, and steps done within it (for mid-epoch resume)."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


@dataclass
class Plan:
    """Sizes derived once from the config, the index and the host count (identical on every host)."""
    host_batch: int
    host_index: int
    host_count: int
    steps_per_epoch: int
    total_steps: int


# ---- building blocks ----------------------------------------------------------------------------------------------

def build_plan(cfg: TrainConfig, index: dict, device: Device) -> Plan:
    host_index, host_count = device.host_index_count()
    host_batch = cfg.host_batch_size(host_count)
    micro = steps_per_epoch(index, cfg.data, host_batch * host_count)
    per_epoch = micro // cfg.grad_accum
    if per_epoch < 1:
        raise ConfigError(f"split {cfg.data.train_split!r} gives {micro} micro-batches of {host_batch * host_count} "
                          f"per epoch, fewer than grad_accum={cfg.grad_accum}: lower global_batch_size")
    total = cfg.max_steps or cfg.epochs * per_epoch
    return Plan(host_batch, host_index, host_count, per_epoch, total)


def _rng_isolated(batches: Iterable[dict]) -> Iterator[dict]:
    """Pull batches without touching the global CPU RNG: a DataLoader draws its base seed from it when it starts,
    and a resumed run starts its loader at a different point than an uninterrupted one."""
    it = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def restore(state: dict, optimizer: torch.optim.Optimizer, device: Device, cfg: TrainConfig) -> RunState:
    """Load a checkpoint's optimiser and RNG states (after the model moved to its device); returns where the run was."""
    saved = state["config"]
    for key in ("seed", "global_batch_size", "grad_accum"):
        if saved.get(key) != getattr(cfg, key):
            # The data order of the rest of the epoch follows these: the run continues, but not as it would have.
            print(f"train: warning: resuming with {key}={getattr(cfg, key)}, the checkpoint used {saved.get(key)}",
                  file=sys.stderr, flush=True)
    optimizer.load_state_dict(state["optimizer"])
    device.set_rng_state(state["rng"])
    return RunState(step=state["step"], epoch=state["epoch"], step_in_epoch=state["step_in_epoch"])


def load_weights(state: dict, model: VJEPA) -> None:
    model.encoder.load_state_dict(state["encoder"])
    model.target_encoder.load_state_dict(state["target_encoder"])
    model.predictor.load_state_dict(state["predictor"])


def checkpoint_state(model: VJEPA, optimizer: torch.optim.Optimizer, device: Device, run: RunState,
                     sched: Schedules, cfg: TrainConfig) -> dict:
    return {
        "step": run.step, "epoch": run.epoch, "step_in_epoch": run.step_in_epoch, "seed": cfg.seed,
        "encoder": device.to_cpu(model.encoder.state_dict()),
        "target_encoder": device.to_cpu(model.target_encoder.state_dict()),
        "predictor": device.to_cpu(model.predictor.state_dict()),
        "optimizer": device.to_cpu(optimizer.state_dict()),
        "schedules": sched.state(run.step),
        "rng": device.rng_state(),
        "config": to_dict(cfg),
    }


def train_step(model: VJEPA, optimizer: torch.optim.Optimizer, batches: Iterator[dict], *, device: Device,
               cfg: TrainConfig, sched: Schedules, step: int, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One optimiser step over grad_accum micro-batches; returns detached device tensors (no host sync)."""
    totals: dict[str, torch.Tensor] = {}
    for _ in range(cfg.grad_accum):
        batch = next(batches)
        x = to_model_input(batch["volume"], batch["scale"], batch["shift"], flip=batch["flip"])  # (B, 1, D, H, W) f32
        with device.autocast():
            out = model(x, batch_masks(batch))
        (out["loss"] / cfg.grad_accum).backward()
        for name in ("loss", "pred_std", "target_std"):
            value = out[name].detach().float() / cfg.grad_accum
            totals[name] = totals[name] + value if name in totals else value
        totals["skipped"] = totals["skipped"] + batch["skipped"] if "skipped" in totals else batch["skipped"]
    totals["grad_norm"] = clip_gradients(params, cfg.optim.clip_grad).detach()
    set_hparams(optimizer, lr=sched.lr(step), weight_decay=sched.weight_decay(step))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Momentum as uploaded data, not a python scalar: XLA bakes some scalars (0, 1) into the graph as constants.
    model.update_target(torch.tensor(sched.momentum(step), dtype=torch.float32).to(device.torch_device))
    return totals


@torch.no_grad()
def validate(model: VJEPA, cfg: TrainConfig, device: Device, index: dict, masks: MultiBlockMasks,
             plan: Plan) -> dict[str, torch.Tensor]:
    """Loss over every val volume and the collapse diagnostics (`trainer.diagnostics`), as device tensors."""
    def batches(limit: int | None) -> Iterator[dict]:
        loader = iter_full_val(cfg.data, index=index, batch_size=plan.host_batch, masks=masks, seed=cfg.seed,
                               host_index=plan.host_index, host_count=plan.host_count, limit=limit)
        return device.wrap_loader(_rng_isolated(loader), len(cfg.model.masks.blocks))

    return evaluate(model, batches, device=device, fixed_batches=cfg.data.val_batches)


def write_config(cfg: TrainConfig, path: str) -> None:
    storage.write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


# ---- the run ------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or continue) the configured pretraining; returns a summary (steps, paths)."""
    if storage.is_remote(cfg.run_dir):
        raise ConfigError(f"run_dir {cfg.run_dir!r} must be a local directory (metrics.jsonl is appended to); "
                          "put checkpoints on GCS with checkpoint.dir=gs://...")
    # -- device, data plan
    device = build_device(cfg.device, cfg.precision)
    cfg.model.encoder.attn_impl = device.attn_impl(cfg.model.encoder.attn_impl)
    index = read_index(cfg.data.shards)
    plan = build_plan(cfg, index, device)
    num_masks = len(cfg.model.masks.blocks)

    # -- model, optimiser, schedules, checkpoint to resume from
    device.seed(cfg.seed)
    model = VJEPA(cfg.model)
    masks = MultiBlockMasks(model.grid, cfg.model.masks)
    store = CheckpointStore(cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.keep_last)
    resume_url = resolve_resume(cfg.checkpoint.resume, store)
    state = load_checkpoint(resume_url) if resume_url else None
    if state is not None:
        load_weights(state, model)
    model.to(device.torch_device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim, capturable=device.kind == "xla")
    sched = Schedules(cfg.optim, plan.total_steps)
    run = restore(state, optimizer, device, cfg) if state is not None else RunState()
    del state

    # -- outputs
    if device.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        write_config(cfg, os.path.join(cfg.run_dir, CONFIG_NAME))
    log = cfg.logging
    monitor = Monitor(run_dir=cfg.run_dir, total_steps=plan.total_steps, start_step=run.step,
                      global_batch_size=cfg.global_batch_size, enabled=device.is_main, wandb_mode=log.wandb,
                      wandb_project=log.wandb_project, wandb_entity=log.wandb_entity, run_name=log.run_name,
                      config=to_dict(cfg),
                      extra=(lambda: {"xla_compiles": device.compile_count()}) if device.kind == "xla" else None)
    print(f"train: {cfg.run_dir} on {device.kind} ({plan.host_count} host(s), {plan.host_batch} samples/host/micro-"
          f"batch), {plan.steps_per_epoch} steps/epoch, steps {run.step} -> {plan.total_steps}"
          + (f", resumed from {resume_url}" if resume_url else ""), flush=True)

    # -- loop: one pass of this while per epoch (or the rest of a resumed epoch)
    mask_image_due = log.mask_images and device.is_main
    last_saved = run.step if resume_url else -1
    while run.step < plan.total_steps:
        # Deterministic per (seed, epoch, host): starting after the consumed micro-batches (composed again, not
        # read) resumes mid-epoch exactly.
        loader = build_train_loader(cfg.data, index=index, batch_size=plan.host_batch, masks=masks, seed=cfg.seed,
                                    epoch=run.epoch, host_index=plan.host_index, host_count=plan.host_count,
                                    start=run.step_in_epoch * cfg.grad_accum)
        steps = min(plan.steps_per_epoch - run.step_in_epoch, plan.total_steps - run.step)
        cpu_batches: Iterator[dict] = _rng_isolated(islice(loader, steps * cfg.grad_accum))
        if mask_image_due:
            head = next(cpu_batches)
            monitor.log_mask_image(run.step, head["volume"][0, 0].numpy(),
                                   [(c[0], t[0]) for c, t in head["masks"]], model.grid, cfg.model.encoder.patch_size)
            cpu_batches, mask_image_due = chain([head], cpu_batches), False
        batches = device.wrap_loader(cpu_batches, num_masks)
        epoch = run.epoch
        for _ in range(steps):
            stats = train_step(model, optimizer, batches, device=device, cfg=cfg, sched=sched, step=run.step,
                               params=params)
            scalars = {"lr": sched.lr(run.step), "weight_decay": sched.weight_decay(run.step),
                       "momentum": sched.momentum(run.step)}
            run.step += 1
            run.step_in_epoch += 1
            if run.step_in_epoch == plan.steps_per_epoch:
                run.epoch, run.step_in_epoch = run.epoch + 1, 0
            if run.step % log.log_every == 0 or run.step == plan.total_steps:
                device.add_step_closure(monitor.log_train, (run.step, epoch, stats, scalars))
            device.mark_step()
            if cfg.val_every and run.step % cfg.val_every == 0:
                device.add_step_closure(monitor.log_val, (run.step, validate(model, cfg, device, index, masks, plan)))
                device.mark_step()
            if cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0:
                _save(store, model, optimizer, device, run, sched, cfg)
                last_saved = run.step

    # -- the end: the last step's diagnostics (whatever val_every), final checkpoint, encoder export, loss curve
    if cfg.val_every and run.step % cfg.val_every:
        device.add_step_closure(monitor.log_val, (run.step, validate(model, cfg, device, index, masks, plan)))
        device.mark_step()
    if run.step != last_saved:
        _save(store, model, optimizer, device, run, sched, cfg)
    encoder_path = os.path.join(cfg.run_dir, ENCODER_NAME)
    if device.is_main:
        export_encoder(encoder_path, model, cfg)
    curve = monitor.finish()
    print(f"train: done at step {run.step}; encoder -> {encoder_path}", flush=True)
    return {"step": run.step, "run_dir": cfg.run_dir, "encoder": encoder_path, "loss_curve": curve,
            "checkpoint": store.latest() if device.is_main else None}


def _save(store: CheckpointStore, model: VJEPA, optimizer: torch.optim.Optimizer, device: Device, run: RunState,
          sched: Schedules, cfg: TrainConfig) -> None:
    # Model and optimiser are replicated on every host, so the main host alone copies them out and writes.
    if device.is_main:
        url = store.save(run.step, checkpoint_state(model, optimizer, device, run, sched, cfg), to_dict(cfg))
        print(f"train: checkpoint step {run.step} -> {url}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"octjepa train: bad config: {exc}", file=sys.stderr)
        return 2
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
