"""torch.distributed for the trainer: the process group an engine starts, model wrapping, and what ranks agree on.

    torchrun --standalone --nproc_per_node 8 -m octjepa_cli train --config ...             # one GPU node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m octjepa_cli train --config ...                                                     # four nodes

The process group comes from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
NCCL on CUDA, gloo on the CPU; nothing here starts a process. On a TPU pod the device layer starts a CPU gloo
group over the hosts (`init_method="xla://"`) for the same agreements. A test harness may start a group itself
before calling the trainer: an existing group is used as it is.

Ranks agree through a CPU (gloo) group, never through the accelerator: stopping (SIGTERM on any rank stops every
rank after the same step), the checkpoint to resume from, whether every rank could read it. Metrics are averaged
(loss, stds, grad norm) or summed (skipped samples) over ranks on logging steps only.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(kind: str) -> None:
    """Join the process group torchrun describes in the environment (no-op for one process or an existing group)."""
    if dist.is_initialized() or env_world_size() <= 1:
        return
    if kind == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_CONTROL: list[Any] = []


def control_group() -> Any:
    """A gloo group over every rank for small CPU-side agreements (the default group when it is gloo already)."""
    if not _CONTROL:
        _CONTROL.append(dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _CONTROL[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (one tiny CPU all-reduce; local value without a group)."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    return not any_rank(not flag)


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable value)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier(group=control_group())


# ---- stopping on SIGTERM ----------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM (a preempted VM, a scheduler's stop, torchrun forwarding its own) asks the run to stop after the step
    it is in. The handler only sets a flag; the loop reads it between steps, and `agreed()` makes every rank stop
    after the same step."""

    def __init__(self, install: bool = True) -> None:
        self.requested = False
        self.installed = install
        self._previous: Any = None
        if install:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        # Not installed (a TPU, where the preemption sync point answers instead): nothing to agree on.
        return any_rank(self.requested) if self.installed else False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---- model wrapping ---------------------------------------------------------------------------------------------


def block_lists(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the context encoder, the target encoder and the predictor (the FSDP2 units)."""
    return [blk for part in (model.encoder, model.target_encoder, model.predictor) for blk in part.blocks]


def wrap_model(model: nn.Module, sharding: str, torch_device: torch.device) -> nn.Module:
    """The module the train step calls: the model itself with one process, DDP (`replicated`) or the model sharded
    in place by FSDP2 (`fsdp`: `fully_shard` per block, then the whole) over the ranks."""
    world = rank_world()[1]
    if world == 1:
        return model
    if sharding == "replicated":
        ids = [torch_device.index] if torch_device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch_device.type, (world,), mesh_dim_names=("fsdp",))
    for blk in block_lists(model):
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def grad_sync(step_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter of micro-batches before the last one of an accumulation."""
    if isinstance(step_model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else step_model.no_sync()
    if hasattr(step_model, "set_requires_gradient_sync"):  # FSDP2
        step_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly distributed one (FSDP2's grad norm is a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reduce_metrics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Step metrics over every rank: `skipped` summed, everything else averaged (one all-reduce, logging steps only)."""
    if rank_world()[1] == 1:
        return stats
    names = sorted(stats)
    world = rank_world()[1]
    flat = torch.stack(
        [local_value(stats[n]).float().sum() if n == "skipped" else local_value(stats[n]).float() for n in names]
    )
    dist.all_reduce(flat)
    return {n: (flat[i] if n == "skipped" else flat[i] / world) for i, n in enumerate(names)}


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over every rank (each holds its part of a sum); call on every rank."""
    if rank_world()[1] == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t
