"""What a checkpoint of a run holds, and how every rank (or TPU host) writes it and reads it back.

    save_checkpoint(store, device, model, optimizer, run, sched, cfg)   # every rank, after the same step
    resume = Resume(cfg, store, device, check)      # before any model: which checkpoint (one decision, made by rank 0
                                                    # and broadcast), its counters read and checked by `check`
    ...                                             # build, place and wrap the model; build the optimiser
    run = resume.load(model, optimizer)             # tensors (DCP, resharded to this run) and this rank's RNG

Model and optimiser state go through torch.distributed.checkpoint keyed by parameter name
(`get_state_dict`/`set_state_dict`), so a checkpoint written by FSDP2 shards, by DDP, by one process or by the
TPU pod's SPMD hosts loads under any of them. With "auto", a checkpoint that any rank cannot read (a cut
state.pt, a cut tensor file, a missing RNG file) is skipped for the one before it, on every rank alike, with a
warning naming it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shards import storage
from shards.typed_config import to_dict
from trainer.checkpoint import (
    DCP_DIR,
    LEGACY_FORMAT,
    SINGLE_PROCESS_WARNING,
    CheckpointStore,
    CheckpointUnreadable,
    checkpoint_dir,
    dcp_writer,
    load_checkpoint,
    load_dcp,
    load_torch,
    resume_candidates,
    rng_name,
    torch_bytes,
)
from trainer.config import TrainConfig
from trainer.device import Device
from trainer.optim import Schedules


@dataclass
class RunState:
    """Where the run is: optimiser steps done, the epoch, and steps done within it (for mid-epoch resume)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def model_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optim": ...} keyed by parameter name, sharded tensors as they are (FSDP2 DTensors, XLA
    sharded tensors): what DCP writes, and the template it loads into in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(
    store: CheckpointStore,
    device: Device,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run: RunState,
    sched: Schedules,
    cfg: TrainConfig,
) -> str | None:
    """Every rank writes its part of the checkpoint of `run.step`; rank 0 completes it. Returns its URL on rank 0."""
    import torch.distributed.checkpoint as dcp

    rank, world = device.host_index_count()
    where = device.broadcast(store.begin(run.step) if rank == 0 else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        dcp.save(
            model_state(model, optimizer),
            storage_writer=dcp_writer(storage.join(where, DCP_DIR)),
            planner=device.save_planner(),
            process_group=device.checkpoint_group(),
            no_dist=world == 1,
        )
    storage.write_bytes(storage.join(where, rng_name(rank)), torch_bytes(device.rng_state()))
    device.barrier()  # every rank's files are there before state.pt marks the checkpoint complete
    url = None
    if rank == 0:
        counters = {
            "step": run.step,
            "epoch": run.epoch,
            "step_in_epoch": run.step_in_epoch,
            "seed": cfg.seed,
            "host_count": world,
            "sharding": cfg.sharding,
            "schedules": sched.state(run.step),
            "config": to_dict(cfg),
        }
        url = store.commit(run.step, where, counters, to_dict(cfg))
    device.barrier()  # nobody starts the next save (which clears leftovers) before this one is published
    return url


# What a rank meets in a checkpoint it cannot use: a cut or garbled torch file, a file that is not there, or DCP's
# collective error (every rank raises it when any rank failed to read its share).
def _unreadable_errors() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint import CheckpointException

    return CheckpointUnreadable, FileNotFoundError, CheckpointException


def describe(error: BaseException) -> str:
    """One line for a checkpoint read error (DCP's collective error carries each rank's exception and traceback)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        return "; ".join(
            f"rank {rank}: {describe(exc[0] if isinstance(exc, tuple) else exc)}"
            for rank, exc in sorted(failures.items())
        )
    lines = str(error).splitlines()
    if isinstance(error, CheckpointUnreadable):  # ours: already names the file and what is wrong with it
        return lines[0]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


class Resume:
    """The checkpoint a run continues from, decided once for every rank, with fallbacks when it cannot be read.

    `check(url, state)` runs on each chosen checkpoint's counters before anything is loaded (it raises to refuse)."""

    def __init__(
        self, cfg: TrainConfig, store: CheckpointStore, device: Device, check: Callable[[str, dict], None]
    ) -> None:
        self.device, self.check = device, check
        self.explicit = cfg.checkpoint.resume not in ("", "auto")
        self.root = store.root
        # Rank 0 lists; every rank tries the same checkpoints in the same order.
        self.candidates: list[str] = device.broadcast(
            resume_candidates(cfg.checkpoint.resume, store) if device.is_main else None
        )
        self.tried: list[str] = []
        self.url, self.state = self._next()

    def _next(self) -> tuple[str | None, dict | None]:
        while self.candidates:
            url = self.candidates.pop(0)
            self.tried.append(url)
            state, error = None, None
            try:
                state = load_checkpoint(url)
            except _unreadable_errors() as exc:
                error = exc
            if self.device.all_ok(error is None):
                self.check(url, state)
                return url, state
            self._skip(url, error)
        if self.tried:
            raise CheckpointUnreadable(f"no readable checkpoint under {self.root}: tried {', '.join(self.tried)}")
        return None, None

    def _skip(self, url: str, error: BaseException | None) -> None:
        why = describe(error) if error is not None else "another rank could not read it"
        if self.explicit:
            raise CheckpointUnreadable(f"checkpoint {url} cannot be read: {why}") from error
        if self.device.is_main or error is not None:
            print(
                f"train: warning: {why} (checkpoint {url}); falling back to the previous checkpoint",
                file=sys.stderr,
                flush=True,
            )

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> RunState:
        """Load the chosen checkpoint's tensors into the (placed, wrapped) model and the optimiser, and this
        rank's RNG states; a fresh RunState when there is nothing to resume."""
        while self.state is not None:
            rng, error = None, None
            try:
                self._load_tensors(model, optimizer)
                rng = self._rng()
            except _unreadable_errors() as exc:
                error = exc
            if self.device.all_ok(error is None):
                self.device.set_rng_state(rng)
                s = self.state
                return RunState(step=s["step"], epoch=s["epoch"], step_in_epoch=s["step_in_epoch"])
            self._skip(self.url, error)
            self.url, self.state = self._next()
        return RunState()

    def _load_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if self.state["format"] == LEGACY_FORMAT:
            full = legacy_full_state(self.state, model, optimizer)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=full["model"],
                optim_state_dict=full["optim"],
                options=StateDictOptions(full_state_dict=True),
            )
            self.device.after_optimizer_load(optimizer)
            return
        self.device.prepare_optimizer_for_load(optimizer)
        state = model_state(model, optimizer)
        load_dcp(
            self.url,
            state,
            planner=self.device.load_planner(),
            process_group=self.device.checkpoint_group(),
            no_dist=self.device.host_index_count()[1] == 1,
        )
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def _rng(self) -> dict:
        if self.state["format"] == LEGACY_FORMAT:
            return self.state["rng"]
        rank = self.device.host_index_count()[0]
        # A run resumed at an epoch boundary on more ranks than saved it reuses the saved ranks' states in turn.
        saved_ranks = int(self.state.get("host_count", 1))
        return load_torch(storage.join(checkpoint_dir(self.url), rng_name(rank % saved_ranks)))


def legacy_full_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A v1 checkpoint (one process, every tensor in state.pt, optimiser state keyed by position) as full state
    dicts keyed by parameter name, the form `set_state_dict(..., full_state_dict=True)` loads under any sharding."""
    model_sd = {f"{part}.{k}": v for part in ("encoder", "target_encoder", "predictor") for k, v in state[part].items()}
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    old = state["optimizer"]
    optim_sd = {
        "state": {order[int(i)]: st for i, st in old["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in old["param_groups"]],
    }
    return {"model": model_sd, "optim": optim_sd}
