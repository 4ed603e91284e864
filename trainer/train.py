"""Pretrain V-JEPA 2 3D on a shard set: on the CPU, one or many CUDA GPUs (torchrun), or a TPU pod (torch_xla SPMD).

    octjepa train --config configs/smoke.yaml
    python -m trainer.train --config configs/smoke.yaml run_dir=runs/try max_steps=50 optim.lr=0.0003
    octjepa train --config configs/pretrain_vjepa_multi_domain.yaml --resume auto    # continue the latest checkpoint
    torchrun --standalone --nproc_per_node 8 -m octjepa_cli train --config ... [sharding=fsdp]   # one GPU node

Writes <run_dir>/config.yaml (the config as given, overrides applied), resolved.yaml (what the platform chose: the
attention kernel, precision, hosts, per-host batch), metrics.jsonl, checkpoints/ (or checkpoint.dir, may be gs://),
encoder.pt (the encoder `checkpoint.export_encoder` names, see `trainer.checkpoint.load_encoder`), loss_curve.png
and a mask image; with several processes (torchrun ranks, TPU hosts) only the first writes them, and every one writes
its part of each checkpoint. SIGTERM stops the run after the step it is in, with a complete checkpoint, and exit
status 0.

The step is XLA-clean: static shapes (mask sizes come from the config), hyperparameters computed on the host from
the step number, metrics read only in step closures on logging steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain, islice
from typing import Any

import torch
import yaml
from torch import nn

from model import VJEPA, MultiBlockMasks
from shards import storage
from shards.typed_config import ConfigError, to_dict
from trainer.batch import batch_masks
from trainer.checkpoint import CheckpointStore, export_encoder
from trainer.config import TrainConfig, load_train_config
from trainer.data import build_train_loader, iter_full_val, steps_per_epoch, to_model_input
from trainer.device import Device, build_device
from trainer.diagnostics import evaluate
from trainer.monitor import Monitor
from trainer.optim import Schedules, build_optimizer, clip_gradients, set_hparams
from trainer.preflight import check_resume_data_order, check_shard_files, check_splits, read_run_index
from trainer.train_state import Resume, RunState, save_checkpoint

ENCODER_NAME = "encoder.pt"
CONFIG_NAME = "config.yaml"
RESOLVED_NAME = "resolved.yaml"
PROFILE_DIR = "profile"
XLA_CACHE_DIR = "xla_cache"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="octjepa train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/smoke.yaml")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint, if any) or a checkpoint path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.0003 max_steps=100")
    return p.parse_args(argv)


@dataclass
class RunSizes:
    """Sizes derived once from the config, the index and the host count (identical on every host)."""

    host_batch: int
    host_index: int
    host_count: int
    steps_per_epoch: int
    total_steps: int


# ---- building blocks ----------------------------------------------------------------------------------------------


def run_sizes(cfg: TrainConfig, index: dict, device: Device) -> RunSizes:
    host_index, host_count = device.host_index_count()
    host_batch = cfg.host_batch_size(host_count, device.local_devices())
    micro = steps_per_epoch(index, cfg.data, host_batch * host_count)
    per_epoch = micro // cfg.grad_accum
    if per_epoch < 1:
        raise ConfigError(
            f"split {cfg.data.train_split!r} gives {micro} micro-batches of {host_batch * host_count} "
            f"per epoch, fewer than grad_accum={cfg.grad_accum}: lower global_batch_size"
        )
    total = cfg.max_steps or cfg.epochs * per_epoch
    return RunSizes(host_batch, host_index, host_count, per_epoch, total)


def resolved_choices(cfg: TrainConfig, device: Device, sizes: RunSizes) -> dict[str, Any]:
    """What the platform decided where the config leaves it open, saved beside the config the user gave (never
    written into it): the attention kernel ("sdpa" is the Pallas flash kernel on a TPU), precision, the process
    layout and per-host batch."""
    return {
        "device": device.kind,
        "attn_impl": device.attn_impl(cfg.model.encoder.attn_impl),
        "autocast_dtype": str(device.dtype).removeprefix("torch.") if device.dtype else "float32",
        "sharding": cfg.sharding,
        "hosts": sizes.host_count,
        "host_batch": sizes.host_batch,
        "steps_per_epoch": sizes.steps_per_epoch,
        "total_steps": sizes.total_steps,
    }


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


def check_resume(url: str, state: dict, cfg: TrainConfig, sizes: RunSizes) -> None:
    """Before any model is built: the checkpoint can continue this run's data order (else ConfigError)."""
    saved = state["config"]
    check_resume_data_order(
        saved,
        state.get("host_count"),
        cfg,
        step_in_epoch=state["step_in_epoch"],
        host_count=sizes.host_count,
        batches_per_epoch=sizes.steps_per_epoch * cfg.grad_accum,
        url=url,
    )
    for key in ("seed", "global_batch_size", "grad_accum"):
        if saved.get(key) != getattr(cfg, key) and sizes.host_index == 0:
            # The data order of the rest of the epoch follows these: the run continues, but not as it would have.
            print(
                f"train: warning: resuming with {key}={getattr(cfg, key)}, the checkpoint used {saved.get(key)}",
                file=sys.stderr,
                flush=True,
            )


def train_step(
    model: VJEPA,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict],
    *,
    device: Device,
    cfg: TrainConfig,
    sched: Schedules,
    step: int,
    params: list[torch.Tensor],
    step_model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step over grad_accum micro-batches; returns detached device tensors (no host sync).
    `step_model` runs forward and backward when it is not `model` itself (DDP under torchrun)."""
    step_model = model if step_model is None else step_model
    totals: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        x = to_model_input(batch["volume"], batch["scale"], batch["shift"], flip=batch["flip"])  # (B, 1, D, H, W) f32
        # Ranks exchange gradients once per optimiser step, on the last micro-batch.
        with device.grad_sync(step_model, micro == cfg.grad_accum - 1):
            with device.autocast():
                out = step_model(x, batch_masks(batch))
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
def validate(
    model: VJEPA,
    step_model: nn.Module,
    cfg: TrainConfig,
    device: Device,
    index: dict,
    masks: MultiBlockMasks,
    sizes: RunSizes,
) -> dict[str, torch.Tensor]:
    """Loss over every val volume and the collapse diagnostics (`trainer.diagnostics`), as device tensors; the same
    values whatever the number of torchrun ranks (each rank computes its rows of the batches a single process would,
    see `Device.val_share`, and the sums are added over ranks)."""
    host_index, host_count, batch_size, rows = device.val_share(sizes.host_batch, sizes.host_index, sizes.host_count)

    def batches(limit: int | None) -> Iterator[dict]:
        loader = iter_full_val(
            cfg.data,
            index=index,
            batch_size=batch_size,
            masks=masks,
            seed=cfg.seed,
            host_index=host_index,
            host_count=host_count,
            limit=limit,
        )
        return device.wrap_loader(_rng_isolated(loader), len(cfg.model.masks.blocks), rows=rows)

    return evaluate(model, batches, device=device, fixed_batches=cfg.data.val_batches, forward=step_model)


def write_config(cfg: TrainConfig, path: str) -> None:
    storage.write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


class Trace:
    """`profile.steps` steps from `profile.start_step` traced into <run_dir>/profile (XLA: also a profiler server)."""

    def __init__(self, cfg: TrainConfig, device: Device) -> None:
        self.cfg, self.device, self.active = cfg.profile, device, False
        self.log_dir = os.path.join(cfg.run_dir, PROFILE_DIR)

    def before_step(self, step: int) -> None:
        if self.cfg.steps and step == self.cfg.start_step:
            self.device.start_trace(self.log_dir, self.cfg.port)
            self.active = True
        elif self.active and step == self.cfg.start_step + self.cfg.steps:
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            print(f"train: profile of steps {self.cfg.start_step}.. -> {self.device.stop_trace()}", flush=True)


# ---- the run ------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or continue) the configured pretraining; returns a summary (steps, paths, whether SIGTERM stopped it)."""
    if storage.is_remote(cfg.run_dir):
        raise ConfigError(
            f"run_dir {cfg.run_dir!r} must be a local directory (metrics.jsonl is appended to); "
            "put checkpoints on GCS with checkpoint.dir=gs://..."
        )
    # -- device, data plan, checkpoint to resume from: every check before any model is built
    device = build_device(cfg.device, cfg.precision, cfg.sharding, cache_dir=os.path.join(cfg.run_dir, XLA_CACHE_DIR))
    say = print if device.is_main else (lambda *a, **k: None)
    index = read_run_index(cfg)
    check_splits(cfg, index, host_count=device.host_index_count()[1])
    check_shard_files(cfg, index)
    sizes = run_sizes(cfg, index, device)
    choices = resolved_choices(cfg, device, sizes)
    num_masks = len(cfg.model.masks.blocks)
    store = CheckpointStore(cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.keep_last)
    device.check_checkpoint_dir(store.root)
    resume = Resume(cfg, store, device, check=lambda url, state: check_resume(url, state, cfg, sizes))

    # -- model (placed, then wrapped or sharded), optimiser, schedules, the resumed state
    device.seed(cfg.seed)
    model = VJEPA(replace(cfg.model, encoder=replace(cfg.model.encoder, attn_impl=choices["attn_impl"])))
    masks = MultiBlockMasks(model.grid, cfg.model.masks)
    model.to(device.torch_device).train()
    step_model = device.wrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim, capturable=device.kind == "xla")
    sched = Schedules(cfg.optim, sizes.total_steps)
    run = resume.load(model, optimizer)
    resume_url = resume.url

    # -- outputs
    if device.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        write_config(cfg, os.path.join(cfg.run_dir, CONFIG_NAME))
        resolved = yaml.safe_dump(choices, sort_keys=False).encode()
        storage.write_bytes(os.path.join(cfg.run_dir, RESOLVED_NAME), resolved)
    log = cfg.logging
    monitor = Monitor(
        run_dir=cfg.run_dir,
        total_steps=sizes.total_steps,
        start_step=run.step,
        global_batch_size=cfg.global_batch_size,
        enabled=device.is_main,
        wandb_mode=log.wandb,
        wandb_project=log.wandb_project,
        wandb_entity=log.wandb_entity,
        run_name=log.run_name,
        config=to_dict(cfg),
        extra=(lambda: {"xla_compiles": device.compile_count()}) if device.kind == "xla" else None,
    )
    say(
        f"train: {cfg.run_dir} on {device.kind} ({sizes.host_count} host(s)/rank(s), {sizes.host_batch} samples/host/"
        f"micro-batch, sharding {cfg.sharding}), {sizes.steps_per_epoch} steps/epoch, steps {run.step} -> "
        f"{sizes.total_steps}" + (f", resumed from {resume_url}" if resume_url else ""),
        flush=True,
    )

    # -- loop: one pass of this while per epoch (or the rest of a resumed epoch)
    mask_image_due = log.mask_images and device.is_main
    last_saved = run.step if resume_url else -1
    stop, stopped, trace = device.stop_signal(), False, Trace(cfg, device)
    try:
        while run.step < sizes.total_steps and not stopped:
            # Deterministic per (seed, epoch, host): starting after the consumed micro-batches (composed again, not
            # read) resumes mid-epoch exactly.
            loader = build_train_loader(
                cfg.data,
                index=index,
                batch_size=sizes.host_batch,
                masks=masks,
                seed=cfg.seed,
                epoch=run.epoch,
                host_index=sizes.host_index,
                host_count=sizes.host_count,
                start=run.step_in_epoch * cfg.grad_accum,
            )
            steps = min(sizes.steps_per_epoch - run.step_in_epoch, sizes.total_steps - run.step)
            cpu_batches: Iterator[dict] = _rng_isolated(islice(loader, steps * cfg.grad_accum))
            if mask_image_due:
                head = next(cpu_batches)
                monitor.log_mask_image(
                    run.step,
                    head["volume"][0, 0].numpy(),
                    [(c[0], t[0]) for c, t in head["masks"]],
                    model.grid,
                    cfg.model.encoder.patch_size,
                )
                cpu_batches, mask_image_due = chain([head], cpu_batches), False
            batches = device.wrap_loader(cpu_batches, num_masks)
            epoch = run.epoch
            for _ in range(steps):
                trace.before_step(run.step)
                stats = train_step(
                    model,
                    optimizer,
                    batches,
                    device=device,
                    cfg=cfg,
                    sched=sched,
                    step=run.step,
                    params=params,
                    step_model=step_model,
                )
                scalars = {
                    "lr": sched.lr(run.step),
                    "weight_decay": sched.weight_decay(run.step),
                    "momentum": sched.momentum(run.step),
                }
                run.step += 1
                run.step_in_epoch += 1
                if run.step_in_epoch == sizes.steps_per_epoch:
                    run.epoch, run.step_in_epoch = run.epoch + 1, 0
                if run.step % log.log_every == 0 or run.step == sizes.total_steps:
                    device.add_step_closure(monitor.log_train, (run.step, epoch, device.reduce_metrics(stats), scalars))
                device.mark_step()
                if cfg.val_every and run.step % cfg.val_every == 0:
                    device.add_step_closure(
                        monitor.log_val, (run.step, validate(model, step_model, cfg, device, index, masks, sizes))
                    )
                    device.mark_step()
                if cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0:
                    _save(store, model, optimizer, device, run, sched, cfg)
                    last_saved = run.step
                # Every rank stops after the same step: a SIGTERM on any of them, or the TPU's preemption notice.
                if stop.agreed() or device.preempted(run.step):
                    stopped = True
                    break
            if stopped:  # the loader's workers stop now, with the epoch half read, not when the process exits
                for stream in (batches, cpu_batches):
                    getattr(stream, "close", lambda: None)()
    finally:
        stop.close()
        trace.stop()

    # -- the end: the last step's diagnostics (whatever val_every), final checkpoint, encoder export, loss curve
    if cfg.val_every and run.step % cfg.val_every:
        device.add_step_closure(
            monitor.log_val, (run.step, validate(model, step_model, cfg, device, index, masks, sizes))
        )
        device.mark_step()
    if run.step != last_saved:
        _save(store, model, optimizer, device, run, sched, cfg)
    curve = monitor.finish()
    encoder_path = os.path.join(cfg.run_dir, ENCODER_NAME)
    if stopped:
        say(
            f"train: stopped by SIGTERM after step {run.step} of {sizes.total_steps}; continue with --resume auto",
            flush=True,
        )
        return {
            "step": run.step,
            "run_dir": cfg.run_dir,
            "encoder": None,
            "loss_curve": curve,
            "stopped": True,
            "checkpoint": store.latest() if device.is_main else None,
        }
    export_encoder(encoder_path, model, cfg, write=device.is_main)  # every rank: FSDP2 gathers the shards
    say(f"train: done at step {run.step}; encoder -> {encoder_path}", flush=True)
    return {
        "step": run.step,
        "run_dir": cfg.run_dir,
        "encoder": encoder_path,
        "loss_curve": curve,
        "stopped": False,
        "checkpoint": store.latest() if device.is_main else None,
    }


def _save(
    store: CheckpointStore,
    model: VJEPA,
    optimizer: torch.optim.Optimizer,
    device: Device,
    run: RunState,
    sched: Schedules,
    cfg: TrainConfig,
) -> None:
    url = save_checkpoint(store, device, model, optimizer, run, sched, cfg)
    if url is not None:
        print(f"train: checkpoint step {run.step} -> {url}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)  # a ConfigError: one line from the octjepa dispatcher
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
