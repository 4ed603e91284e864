"""Where the train step runs: the CPU, one CUDA GPU, or every TPU chip of a pod through torch_xla SPMD.

This is the only module that imports torch_xla, and only inside the XLA code paths, so the trainer runs where
torch_xla is not installed. On XLA: one process per host, `xr.use_spmd()`, a 1-D ("data",) mesh over every
device of the pod, per-host minibatches sharded onto it by `MpDeviceLoader(input_sharding=...)`, bf16 autocast,
metrics read through step closures. The model and optimiser are replicated; the SPMD partitioner inserts the
gradient all-reduce.

A batch crosses to the device as a flat dict of tensors whose first axis is the batch (the form MpDeviceLoader's
per-key sharding takes): volume, scale, shift, flip, context_<i>/target_<i> per mask configuration, and `skipped`
spread over a (B,) vector (the count in slot 0) so it can be sharded like everything else and summed over hosts.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

KINDS = ("cpu", "cuda", "xla")


def host_index_count() -> tuple[int, int]:
    """(this host's index, number of hosts): torch_xla's process index/count when an XLA runtime is in use,
    torch.distributed's rank/world on GPU when initialised, else (0, 1)."""
    if "torch_xla" in sys.modules and os.environ.get("PJRT_DEVICE"):
        import torch_xla.runtime as xr

        return xr.process_index(), xr.process_count()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def resolve_kind(name: str) -> str:
    """"auto" -> xla when PJRT_DEVICE is set (the TPU launcher sets it), else cuda if available, else cpu."""
    if name == "auto":
        if os.environ.get("PJRT_DEVICE"):
            return "xla"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in KINDS:
        raise ValueError(f"device must be 'auto' or one of {KINDS}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch.cuda.is_available() is False")
    return name


def flatten_batch(batch: dict) -> dict[str, torch.Tensor]:
    """The loader's batch -> the flat dict of (B, ...) tensors that goes to the device (keys stay on the host)."""
    volume = batch["volume"]
    flat = {"volume": volume, "scale": batch["scale"], "shift": batch["shift"], "flip": batch["flip"]}
    for i, (context, target) in enumerate(batch["masks"]):
        flat[f"context_{i}"] = context
        flat[f"target_{i}"] = target
    skipped = torch.zeros(volume.shape[0], dtype=torch.int32)
    skipped[0] = int(batch.get("skipped", 0))
    flat["skipped"] = skipped
    return flat


def batch_masks(flat: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (context_idx, target_idx) pairs of a flat batch, in mask-configuration order."""
    count = sum(1 for k in flat if k.startswith("context_"))
    return [(flat[f"context_{i}"], flat[f"target_{i}"]) for i in range(count)]


def batch_ndims(num_masks: int) -> dict[str, int]:
    """Rank of every tensor of a flat batch; fixes each one's sharding spec before the first batch exists."""
    ndims = {"volume": 5, "scale": 1, "shift": 1, "flip": 1, "skipped": 1}
    for i in range(num_masks):
        ndims[f"context_{i}"] = ndims[f"target_{i}"] = 2
    return ndims


class Device:
    """The plain-torch device (cpu, cuda); `XlaDevice` overrides what SPMD does differently."""

    def __init__(self, kind: str, precision: str = "auto") -> None:
        self.kind = kind
        self.torch_device = torch.device("cuda" if kind == "cuda" else "cpu")
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
        return host_index_count()

    @property
    def is_main(self) -> bool:
        return self.host_index_count()[0] == 0

    def attn_impl(self, requested: str) -> str:
        return requested

    def wrap_loader(self, loader: Iterable[dict], num_masks: int) -> Iterator[dict[str, torch.Tensor]]:
        non_blocking = self.kind == "cuda"
        for batch in loader:
            yield {k: v.to(self.torch_device, non_blocking=non_blocking) for k, v in flatten_batch(batch).items()}

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


class XlaDevice(Device):
    """torch_xla SPMD over every device of the pod (TPU; or the CPU backend with PJRT_DEVICE=CPU in tests)."""

    def __init__(self, precision: str = "auto") -> None:
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        xr.use_spmd()
        n = xr.global_runtime_device_count()
        self.mesh = xs.Mesh(np.arange(n), (n,), ("data",))
        # Global so model code (e.g. flash attention's partition_spec) can find the mesh without a handle.
        xs.set_global_mesh(self.mesh)
        self.kind = "xla"
        self.torch_device = torch_xla.device()
        self.dtype = None if precision == "fp32" else torch.bfloat16
        self.device_type = xr.device_type()

    def host_index_count(self) -> tuple[int, int]:
        import torch_xla.runtime as xr

        return xr.process_index(), xr.process_count()

    def attn_impl(self, requested: str) -> str:
        # "sdpa" names the default kernel; on XLA that is the Pallas flash kernel (model falls back off-TPU).
        return "xla_flash" if requested == "sdpa" else requested

    def wrap_loader(self, loader: Iterable[dict], num_masks: int) -> Iterator[dict[str, torch.Tensor]]:
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.distributed.spmd as xs

        # minibatch=True: each host's batch is its slice of the global batch, sharded over its own devices.
        sharding = {key: xs.ShardingSpec(self.mesh, ("data",) + (None,) * (ndim - 1), minibatch=True)
                    for key, ndim in batch_ndims(num_masks).items()}
        flat = (flatten_batch(b) for b in loader)
        return iter(pl.MpDeviceLoader(flat, self.torch_device, input_sharding=sharding))

    def mark_step(self) -> None:
        import torch_xla

        torch_xla.sync()

    def add_step_closure(self, fn: Callable, args: tuple = ()) -> None:
        import torch_xla.core.xla_model as xm

        xm.add_step_closure(fn, args=args)

    def compile_count(self) -> int | None:
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def to_cpu(self, obj: Any) -> Any:
        import torch_xla.core.xla_model as xm

        # One batched device->host transfer for the whole structure instead of one per tensor.
        return xm._maybe_convert_to_cpu(obj)

    def rng_state(self) -> dict:
        import torch_xla.core.xla_model as xm

        state = super().rng_state()
        state["xla"] = int(xm.get_rng_state())
        return state

    def set_rng_state(self, state: dict) -> None:
        import torch_xla.core.xla_model as xm

        super().set_rng_state(state)
        if "xla" in state:
            xm.set_rng_state(int(state["xla"]))

    def seed(self, seed: int) -> None:
        import torch_xla.core.xla_model as xm

        super().seed(seed)
        xm.set_rng_state(seed)


def build_device(name: str, precision: str = "auto") -> Device:
    kind = resolve_kind(name)
    return XlaDevice(precision) if kind == "xla" else Device(kind, precision)


def _numpy_state() -> dict:
    # As tensors and ints, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _as_tuple(value: Any) -> Any:
    """Python's RNG state is nested tuples; a round trip through some serialisers turns them into lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
