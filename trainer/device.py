"""Where the train step runs: the CPU or CUDA GPUs (one process, or one per GPU under torchrun), or every TPU
chip of a pod through torch_xla SPMD (`trainer.xla_device`).

This module and `trainer.xla_device` are the device layer: the only modules that import torch_xla, and only on
the XLA code paths, so the trainer runs where torch_xla is not installed. On CPU/CUDA under torchrun each rank
drives one device (cuda:LOCAL_RANK), the model is wrapped by DDP (`sharding: replicated`) or FSDP2 (`fsdp`), and
ranks agree through `trainer.distributed`. On XLA: one process per host, SPMD over every device of the pod.

A batch crosses to the device in the flat form `trainer.batch.flatten_batch` gives it.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import distributed
from trainer.batch import flatten_batch

KINDS = ("cpu", "cuda", "xla")


def resolve_kind(name: str) -> str:
    """ "auto" -> xla when PJRT_DEVICE is set (the TPU launcher sets it), else cuda if available, else cpu."""
    if name == "auto":
        if os.environ.get("PJRT_DEVICE"):
            return "xla"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in KINDS:
        raise ValueError(f"device must be 'auto' or one of {KINDS}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch.cuda.is_available() is False")
    return name


class Device:
    """The plain-torch device (cpu, cuda), one per torchrun rank; `XlaDevice` overrides what SPMD does differently."""

    def __init__(self, kind: str, precision: str = "auto", sharding: str = "replicated") -> None:
        self.kind = kind
        self.sharding = sharding
        distributed.init_from_env(kind)
        self.torch_device = torch.device(f"cuda:{distributed.local_rank()}" if kind == "cuda" else "cpu")
        self.dtype = self._autocast_dtype(precision)

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32":
            return None
        if precision == "auto" and self.kind == "cpu":
            return None  # bf16 on CPU is slow on most hosts and changes the numbers the tests compare
        if self.kind == "cuda" and not torch.cuda.is_bf16_supported():
            if precision == "bf16":
                raise RuntimeError("precision: bf16 was asked for but this GPU does not support it")
            return None
        return torch.bfloat16

    @property
    def autocast_type(self) -> str:
        return self.kind

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.autocast_type, dtype=self.dtype)

    def host_index_count(self) -> tuple[int, int]:
        """(this process's index, process count): the torchrun rank and world size, or (0, 1)."""
        return distributed.rank_world()

    def local_devices(self) -> int:
        """Devices this process feeds with its share of the batch."""
        return 1

    @property
    def is_main(self) -> bool:
        return self.host_index_count()[0] == 0

    def attn_impl(self, requested: str) -> str:
        return requested

    def check_checkpoint_dir(self, url: str) -> None:
        """Refuse a checkpoint location the processes cannot share (see `XlaDevice`); torchrun ranks on one node
        share its disk, and across nodes the user names shared storage or gs://."""

    # -- the model, its step and what ranks exchange
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the step calls (DDP / FSDP2 under torchrun, the model itself in one process)."""
        return distributed.wrap_model(model, self.sharding, self.torch_device)

    def grad_sync(self, step_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return distributed.grad_sync(step_model, sync)

    def reduce_metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Step metrics as the whole run saw them (over every rank); call on every rank at the same steps."""
        return distributed.reduce_metrics(stats)

    def sum_over_hosts(self, value: torch.Tensor) -> torch.Tensor:
        """A sum each rank holds part of, over every rank (validation's sums; see `val_share`)."""
        return distributed.sum_over_ranks(value)

    def val_share(self, host_batch: int, host_index: int, host_count: int) -> tuple[int, int, int, slice | None]:
        """(host index, host count, batch size, rows) for the validation loader. Under torchrun every rank composes
        the batches a single process would (host 0 of 1, the whole micro-batch) and computes its own rows of them,
        so val/loss does not depend on the number of ranks."""
        if host_count == 1:
            return host_index, host_count, host_batch, None
        return 0, 1, host_batch * host_count, slice(host_index * host_batch, (host_index + 1) * host_batch)

    def wrap_loader(
        self, loader: Iterable[dict], num_masks: int, rows: slice | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        non_blocking = self.kind == "cuda"
        for batch in loader:
            flat = flatten_batch(batch)
            if rows is not None:
                flat = {k: v[rows] for k, v in flat.items()}
            yield {k: v.to(self.torch_device, non_blocking=non_blocking) for k, v in flat.items()}

    # -- checkpoints and stopping
    def save_planner(self) -> Any:
        return None  # DCP's default planner

    def load_planner(self) -> Any:
        return None

    def checkpoint_group(self) -> Any:
        return None  # the default group when one is initialised

    def prepare_optimizer_for_load(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the optimiser its state tensors before a checkpoint is loaded into them in place
        (`get_state_dict` creates them itself on CPU/CUDA)."""

    def after_optimizer_load(self, optimizer: torch.optim.Optimizer) -> None:
        """Put optimiser state loaded from a full (unsharded) state dict where the sharding wants it."""

    def stop_signal(self) -> distributed.StopSignal:
        return distributed.StopSignal(install=True)

    def preempted(self, step: int) -> bool:
        """Whether the platform announced a preemption that every host sees at this step (TPU only)."""
        return False

    def barrier(self) -> None:
        distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        return distributed.broadcast(obj)

    def all_ok(self, flag: bool) -> bool:
        return distributed.all_ranks(flag)

    # -- profiling
    def start_trace(self, log_dir: str, port: int = 0) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.kind == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()
        self._trace_dir = log_dir

    def stop_trace(self) -> str:
        self._profiler.__exit__(None, None, None)
        os.makedirs(self._trace_dir, exist_ok=True)
        path = os.path.join(self._trace_dir, f"trace-rank{self.host_index_count()[0]}.json")
        self._profiler.export_chrome_trace(path)
        return path

    def mark_step(self) -> None:
        """The end of one traced step; nothing to do eagerly."""

    def add_step_closure(self, fn: Callable, args: tuple = ()) -> None:
        """Run `fn(*args)` once this step's tensors are ready; eagerly that is now (it may read tensors)."""
        fn(*args)

    def compile_count(self) -> int | None:
        """Graph compilations so far (XLA only)."""
        return None

    def to_cpu(self, obj: Any) -> Any:
        """A (nested) state dict with every tensor copied to the CPU, for saving."""
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu()
        if isinstance(obj, dict):
            return {k: self.to_cpu(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.to_cpu(v) for v in obj)
        return obj

    def rng_state(self) -> dict:
        state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
        if self.kind == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, state: dict) -> None:
        random.setstate(_as_tuple(state["python"]))
        _set_numpy_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if self.kind == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])

    def seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def build_device(
    name: str, precision: str = "auto", sharding: str = "replicated", cache_dir: str | None = None
) -> Device:
    """The device of this process. `cache_dir`: XLA's persistent compilation cache (a restart reuses the graphs)."""
    kind = resolve_kind(name)
    if kind == "xla":
        from trainer.xla_device import XlaDevice

        return XlaDevice(precision, sharding=sharding, cache_dir=cache_dir)
    return Device(kind, precision, sharding)


def _numpy_state() -> dict:
    # As tensors and ints, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _as_tuple(value: Any) -> Any:
    """Python's RNG state is nested tuples; a round trip through some serialisers turns them into lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
