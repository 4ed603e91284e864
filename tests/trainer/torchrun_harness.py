"""What the torchrun tests run in each rank (`python -m torch.distributed.run ... tests/trainer/torchrun_harness.py`).

    harness.py grads OUT [overrides...]     the first step's averaged gradients, the validation metrics and the exported
                                            encoder state of a fresh model, for sharding=replicated and fsdp, saved
                                            by rank 0 to OUT/<sharding>-world<N>.pt (also runs without torchrun)
    harness.py train [train args...]        the real `trainer.train.main`, with the test's instruments below

Instruments of `train`, from environment variables the tests set (test code only; the trainer has no hooks):
    HARNESS_KEYS_DIR       each rank appends the keys of every training batch it draws to keys-rank<R>.jsonl
    HARNESS_RANK_CWD       each rank runs in <dir>/rank<R> (relative run_dir: shows which rank writes outputs)
    HARNESS_STALL          "STEP:RANK:SECONDS:MARKER": that rank touches MARKER before optimiser step STEP and sleeps
    HARNESS_GLOO           start a gloo process group from torchrun's environment first: processes playing TPU hosts
    HARNESS_BLIND_RANK     that rank's checkpoint listing finds nothing (a host that would decide alone starts over)
    HARNESS_REPORT         each rank writes <prefix>-rank<R>.json: the checkpoint it resumed from and, on XLA, the
                           sharding spec of every parameter and optimiser state tensor
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import torch

from trainer import train as T

# Tests that run this harness pass tests.trainer.shardset_fixture.NARROW_TINY among their overrides: ViT-Tiny
# narrowed to 48 wide, 2 blocks, 2 heads, the same code in a fraction of the CPU time.
RANK = int(os.environ.get("RANK", "0"))


def record_keys(directory: str) -> None:
    build = T.build_train_loader

    def recording(*args, **kwargs):
        loader = build(*args, **kwargs)

        class Recorded:
            def __len__(self) -> int:
                return len(loader)

            def __iter__(self):
                for batch in loader:
                    with open(os.path.join(directory, f"keys-rank{RANK}.jsonl"), "a") as f:
                        f.write(json.dumps({"epoch": kwargs["epoch"], "keys": batch["keys"]}) + "\n")
                    yield batch

        return Recorded()

    T.build_train_loader = recording


def stall(spec: str) -> None:
    step, rank, seconds, marker = spec.split(":", 3)
    step_fn = T.train_step

    def stalled(*args, **kwargs):
        if kwargs["step"] == int(step) and RANK == int(rank):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(float(seconds))
        return step_fn(*args, **kwargs)

    T.train_step = stalled


def blind() -> None:
    from trainer.checkpoint import CheckpointStore

    CheckpointStore.latest = lambda self: None
    CheckpointStore.steps = lambda self: []


def report(prefix: str) -> Callable[[], None]:
    """Record what the run decided and built; the returned function writes it once the run is over."""
    seen: dict = {}
    resume_cls, build_optimizer = T.Resume, T.build_optimizer

    class Recorded(resume_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["resume"] = self

    def recording_optimizer(model_, *args, **kwargs):
        seen["model"], seen["optimizer"] = model_, build_optimizer(model_, *args, **kwargs)
        return seen["optimizer"]

    T.Resume, T.build_optimizer = Recorded, recording_optimizer

    def write() -> None:
        out = {"rank": RANK, "resumed_from": seen["resume"].url}
        if os.environ.get("PJRT_DEVICE"):
            import torch_xla

            spec = torch_xla._XLAC._get_xla_sharding_spec
            names = {id(p): n for n, p in seen["model"].named_parameters()}
            out["params"] = {n: spec(p) for n, p in seen["model"].named_parameters()}
            out["optim"] = {
                names[id(p)]: {k: spec(v) for k, v in st.items() if torch.is_tensor(v) and v.dim()}
                for p, st in seen["optimizer"].state.items()
            }
        with open(f"{prefix}-rank{RANK}.json", "w") as f:
            json.dump(out, f)

    return write


def run_train(argv: list[str]) -> int:
    if os.environ.get("HARNESS_GLOO"):
        import torch.distributed as dist

        dist.init_process_group("gloo")
    if os.environ.get("HARNESS_BLIND_RANK") == str(RANK):
        blind()
    write_report = report(os.environ["HARNESS_REPORT"]) if os.environ.get("HARNESS_REPORT") else None
    if os.environ.get("HARNESS_KEYS_DIR"):
        record_keys(os.environ["HARNESS_KEYS_DIR"])
    if os.environ.get("HARNESS_STALL"):
        stall(os.environ["HARNESS_STALL"])
    if os.environ.get("HARNESS_RANK_CWD"):
        cwd = os.path.join(os.environ["HARNESS_RANK_CWD"], f"rank{RANK}")
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
    code = T.main(argv)
    if write_report is not None:
        write_report()
    return code


def first_step(out_dir: str, overrides: list[str]) -> None:
    from model import VJEPA, MultiBlockMasks
    from trainer.checkpoint import encoder_state
    from trainer.config import load_train_config
    from trainer.data import build_train_loader
    from trainer.device import build_device
    from trainer.optim import Schedules, build_optimizer
    from trainer.preflight import read_run_index

    for sharding in ("replicated", "fsdp"):
        cfg = load_train_config(overrides[0], overrides[1:] + [f"sharding={sharding}"])
        device = build_device("cpu", "fp32", sharding)
        rank, world = device.host_index_count()
        index = read_run_index(cfg)
        sizes = T.run_sizes(cfg, index, device)
        device.seed(cfg.seed)
        model = VJEPA(cfg.model)
        masks = MultiBlockMasks(model.grid, cfg.model.masks)
        model.train()
        step_model = device.wrap_model(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, cfg.optim)
        names = {id(p): n for n, p in model.named_parameters()}
        grads: dict[str, torch.Tensor] = {}

        def capture(ps, max_norm, _clip=T.clip_gradients, grads=grads, names=names):
            for p in ps:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[names[id(p)]] = g.detach().clone()
            return _clip(ps, max_norm)

        T.clip_gradients = capture
        val = {k: float(v) for k, v in T.validate(model, step_model, cfg, device, index, masks, sizes).items()}
        encoder = encoder_state(model)
        # The same samples by construction: the single-process micro-batches, this rank's rows of each.
        micro = sizes.host_batch * sizes.host_count
        loader = build_train_loader(
            cfg.data, index=index, batch_size=micro, masks=masks, seed=cfg.seed, epoch=0, host_index=0, host_count=1
        )
        rows = slice(rank * sizes.host_batch, (rank + 1) * sizes.host_batch) if world > 1 else None
        batches = device.wrap_loader(loader, len(cfg.model.masks.blocks), rows=rows)
        T.train_step(
            model,
            optimizer,
            batches,
            device=device,
            cfg=cfg,
            sched=Schedules(cfg.optim, sizes.total_steps),
            step=0,
            params=params,
            step_model=step_model,
        )
        T.clip_gradients = capture.__defaults__[0]
        # What each rank logs: the loss averaged, the skipped samples (a (B,) vector, count in slot 0) summed.
        mine = {"loss": torch.tensor(float(rank)), "skipped": torch.tensor([rank + 1, 0], dtype=torch.int32)}
        logged = {k: float(v.sum()) for k, v in device.reduce_metrics(mine).items()}
        if rank == 0:
            torch.save(
                {"grads": grads, "val": val, "encoder": encoder, "logged": logged},
                os.path.join(out_dir, f"{sharding}-world{world}.pt"),
            )


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "grads":
        first_step(rest[0], rest[1:])
        sys.exit(0)
    sys.exit(run_train(rest))
