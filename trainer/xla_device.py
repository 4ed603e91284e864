"""torch_xla SPMD over every device of a TPU pod (or torch_xla's CPU backend with PJRT_DEVICE=CPU in tests).

One process per host, `xr.use_spmd()`, a 1-D mesh over every device of the pod, each host's share of the batch
sharded onto its own devices by `MpDeviceLoader(input_sharding=...)`, bf16 autocast, metrics read through step
closures. `sharding: replicated` replicates params and optimiser state (the partitioner inserts the gradient
all-reduce); `sharding: fsdp` names the mesh axis "fsdp" and shards every parameter along it, as torch_xla's
FSDPv2 guide does, so gradients and AdamW state (created like their params) are sharded too.

With more than one host a CPU gloo process group over the hosts (`init_method="xla://"`, what torch_xla's
CheckpointManager coordinates with) carries the hosts' agreements (resume step, stop); checkpoints are written
and read sharded by every host with torch_xla's SPMD planners for torch.distributed.checkpoint; on TPU the
preemption sync point of torch_xla (the one CheckpointManager's save-on-preemption uses) stops every host at the
same step. The persistent compilation cache lives under the run directory.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from shards import storage
from shards.typed_config import ConfigError
from trainer import distributed
from trainer.batch import batch_ndims, flatten_batch
from trainer.device import Device


def flash_kernel_missing() -> str | None:
    """Why torch_xla's Pallas flash-attention kernel cannot run here (its jax dependency is missing), or None."""
    try:
        import jax  # noqa: F401  the Pallas kernel is traced through jax
        from torch_xla.experimental.custom_kernel import flash_attention  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class XlaDevice(Device):
    """torch_xla SPMD over every device of the pod."""

    def __init__(self, precision: str = "auto", sharding: str = "replicated", cache_dir: str | None = None) -> None:
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        if cache_dir and not torch_xla._XLAC._xla_computation_cache_is_initialized():
            # Before any computation: a restarted run loads its compiled graphs instead of compiling for minutes.
            os.makedirs(cache_dir, exist_ok=True)
            xr.initialize_cache(cache_dir, readonly=False)
        xr.use_spmd()
        if xr.process_count() > 1 and not dist.is_initialized():
            import torch_xla.distributed.xla_backend  # noqa: F401  registers the xla:// rendezvous

            dist.init_process_group("gloo", init_method="xla://")
        n = xr.global_runtime_device_count()
        self.mesh = xs.Mesh(np.arange(n), (n,), ("fsdp" if sharding == "fsdp" else "data",))
        # Global so model code (e.g. flash attention's partition_spec) can find the mesh without a handle.
        xs.set_global_mesh(self.mesh)
        self.kind = "xla"
        self.sharding = sharding
        self.torch_device = torch_xla.device()
        self.dtype = None if precision == "fp32" else torch.bfloat16
        self.device_type = xr.device_type()
        self._preemption = self.device_type == "TPU"
        if self._preemption:
            # What CheckpointManager(chkpt_on_preemption=True) starts: the coordination service's preemption sync
            # manager, which catches the VM's SIGTERM and names one step at which every host sees it.
            torch_xla._XLAC._ensure_xla_coordinator_initialized(
                xr.process_index(), xr.process_count(), xr.get_master_ip()
            )
            torch_xla._XLAC._activate_preemption_sync_manager()

    def host_index_count(self) -> tuple[int, int]:
        import torch_xla.runtime as xr

        if dist.is_initialized():  # on a pod the xla:// group's rank is the process index
            return distributed.rank_world()
        return xr.process_index(), xr.process_count()

    def local_devices(self) -> int:
        import torch_xla.runtime as xr

        return xr.addressable_runtime_device_count()

    def attn_impl(self, requested: str) -> str:
        # "sdpa" names the default kernel; on a TPU that is the Pallas flash kernel, whose dependency is checked
        # here, once, rather than failing inside the first traced forward (off-TPU the model uses SDPA for it).
        if requested not in ("sdpa", "xla_flash"):
            return requested
        if self.device_type == "TPU":
            missing = flash_kernel_missing()
            if missing:
                print(
                    f"train: warning: the Pallas flash-attention kernel cannot run ({missing}); using SDPA "
                    "attention instead. Install the kernel's dependency with pip install -e '.[train,tpu]' "
                    "(torch_xla[pallas])",
                    file=sys.stderr,
                    flush=True,
                )
                return "sdpa"
        return "xla_flash"

    def check_checkpoint_dir(self, url: str) -> None:
        hosts = self.host_index_count()[1]
        if hosts > 1 and not storage.is_remote(url):
            raise ConfigError(
                f"checkpoint.dir {url!r} is on this host's disk, but the run has {hosts} hosts: each "
                "would see only its own checkpoints and resume from a different step. Use shared "
                "storage, e.g. checkpoint.dir=gs://BUCKET/runs/NAME/checkpoints"
            )

    # -- the model: replicated, or sharded along the fsdp axis
    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self.sharding == "fsdp":
            for p in model.parameters():
                self._shard_like_param(p, p)
        return model

    def _shard_like_param(self, param: torch.Tensor, tensor: torch.Tensor) -> None:
        """Shard `tensor` (the param or its optimiser state) along the fsdp axis on the param's first dimension
        that splits evenly over the devices; too small a tensor stays replicated."""
        import torch_xla.distributed.spmd as xs

        n = self.mesh.size()
        for dim, size in enumerate(param.shape):
            if size >= n and size % n == 0:
                spec = [None] * param.dim()
                spec[dim] = "fsdp"
                xs.mark_sharding(tensor, self.mesh, tuple(spec))
                return

    def grad_sync(self, step_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # SPMD: one program; the partitioner places the reductions

    def reduce_metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return stats  # global tensors already: the loss is over the pod's batch

    def sum_over_hosts(self, value: torch.Tensor) -> torch.Tensor:
        return value  # SPMD: a sum over the pod's batch is already global

    def val_share(self, host_batch: int, host_index: int, host_count: int) -> tuple[int, int, int, slice | None]:
        return host_index, host_count, host_batch, None

    def wrap_loader(
        self, loader: Iterable[dict], num_masks: int, rows: slice | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.distributed.spmd as xs

        axis = self.mesh.axis_names[0]
        # minibatch=True: each host's batch is its slice of the global batch, sharded over its own devices.
        sharding = {
            key: xs.ShardingSpec(self.mesh, (axis,) + (None,) * (ndim - 1), minibatch=True)
            for key, ndim in batch_ndims(num_masks).items()
        }
        flat = (flatten_batch(b) for b in loader)
        return iter(pl.MpDeviceLoader(flat, self.torch_device, input_sharding=sharding))

    # -- checkpoints and stopping
    def save_planner(self) -> Any:
        from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

        return SPMDSavePlanner()

    def load_planner(self) -> Any:
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        return SPMDLoadPlanner()

    def checkpoint_group(self) -> Any:
        return dist.group.WORLD if dist.is_initialized() else None

    def prepare_optimizer_for_load(self, optimizer: torch.optim.Optimizer) -> None:
        from torch_xla.experimental.distributed_checkpoint import prime_optimizer

        prime_optimizer(optimizer)

    def after_optimizer_load(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sharding != "fsdp":
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        self._shard_like_param(p, value)

    def stop_signal(self) -> distributed.StopSignal:
        # On a TPU the preemption sync manager owns SIGTERM (a Python handler would replace its handler).
        return distributed.StopSignal(install=not self._preemption)

    def preempted(self, step: int) -> bool:
        if not self._preemption:
            return False
        import torch_xla

        return bool(torch_xla._XLAC._sync_point_reached(step))

    def start_trace(self, log_dir: str, port: int = 9012) -> None:
        import torch_xla.debug.profiler as xp

        if getattr(self, "_profile_server", None) is None:
            self._profile_server = xp.start_server(port)  # also lets TensorBoard's capture_profile attach
        xp.start_trace(log_dir)
        self._trace_dir = log_dir

    def stop_trace(self) -> str:
        import torch_xla.debug.profiler as xp

        xp.stop_trace()
        return self._trace_dir

    # -- the step
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
