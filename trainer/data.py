"""Streaming loader: shard set (index.json) -> fixed-shape uint8 batches with masks, the same step count on every host.

    index = shards.read_index(cfg.data.shards)                  # refuses a set without index.json
    loader = build_train_loader(cfg.data, index=index, batch_size=per_host_batch, masks=masks, seed=cfg.seed,
                                epoch=epoch, host_index=host, host_count=hosts)
    for batch in loader:                                         # exactly len(loader) batches on every host
        b = {k: batch[k].to(dev) for k in ("volume", "scale", "shift", "flip")}
        x = to_model_input(b["volume"], b["scale"], b["shift"], flip=b["flip"])   # z-score, jitter, lateral flip

Each loader worker runs a webdataset pipeline of small stages (``trainer.stages``):
shard source (explicit host/worker split, cycled) -> open + tar read (``shards.storage.open_url``: fsspec, gcsfs
with retries, opened inside the worker; each shard held to its index entry's byte size and sample count) ->
contract check of the CRC32C-checked metadata and the ``.npy`` header -> [per-device buffers when domains are
balanced] -> draw crop, flip and jitter, read the voxels straight into a random slot of a few open batches (the
shuffle buffer) and check their CRC32C there -> static batches with masks; the flip and the normalisation are
applied on the accelerator by ``to_model_input``. The source stage is ours, not ``wds.WebDataset``'s
``split_by_node``/``split_by_worker``: those read torch.distributed's rank, which TPU hosts do not set.

Damage is never trained on: a sample that fails a check is dropped, logged with its shard and key, and counted by
the samples lost (a shard that ends early loses the samples its index lists and it did not hold); each batch
carries the count (``skipped``, which reaches the metrics) and the ``Drop`` records. Where the batches arrive,
``Batches`` charges them to the pass's budget, ``data.max_skipped_fraction`` of the samples the pass reads on this
host, and stops the run with ``DataDamageError`` (one line naming the shards, exit code 1) once a pass is over it.
Each host checks its own share against its own budget (no collective: the budget is not agreed across hosts).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import ContractError, read_index, shard_urls
from trainer import stages
from trainer.batch import View
from trainer.host_split import (
    Shard,
    derive_seed,
    epoch_order,
    host_shards,
    worker_quota,
    worker_shards,
)
from trainer.stages import DataDamageError

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    shards: str = ""  # shard set root (local path or gs://); must hold index.json
    train_split: str = "train"
    val_split: str = "val"
    crop_shape: tuple[int, int, int] = (64, 384, 384)  # (D, H, W); must equal model.encoder.input_shape
    shuffle_buffer: int = 32  # volumes per worker in open batches (rounded up to whole batches): bounds memory
    num_workers: int = 2
    domain_weights: dict[str, float] = field(default_factory=dict)  # device -> weight; empty = natural mix
    flip_lateral: bool = True
    intensity_jitter: float = 0.1  # relative scale and (z-unit) shift jitter, folded into (scale, shift)
    val_batches: int = 4  # val batches per host that form the fixed diagnostic set (effective rank, lookup baseline)
    # Damaged samples a pass may drop, as a fraction of the samples it reads on a host; over it the run stops.
    max_skipped_fraction: float = 0.001

    def __post_init__(self) -> None:
        self.crop_shape = tuple(self.crop_shape)
        if len(self.crop_shape) != 3 or any(int(c) != c or c <= 0 for c in self.crop_shape):
            raise ValueError(f"data.crop_shape must be three positive ints (D, H, W), got {self.crop_shape!r}")
        for name, low in (("shuffle_buffer", 1), ("num_workers", 0), ("val_batches", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"data.{name} must be >= {low}, got {getattr(self, name)}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"data.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if not 0.0 <= self.intensity_jitter < 1.0:
            raise ValueError(f"data.intensity_jitter must be in [0, 1), got {self.intensity_jitter}")
        bad = {d: w for d, w in self.domain_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"data.domain_weights must be >= 0, got {bad}")
        if self.domain_weights and not any(w > 0 for w in self.domain_weights.values()):
            raise ValueError(f"data.domain_weights gives no device a positive weight: {self.domain_weights}")


def steps_per_epoch(index: dict, cfg: DataConfig, global_batch_size: int) -> int:
    """Batches per epoch, from the index's counts alone, so every host computes the same number."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    total = _split_entry(index, cfg.train_split)["num_samples"]
    return max(1, total // global_batch_size)


def to_model_input(
    volume: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8/uint16 (B, 1, D, H, W) -> float32 input, on the accelerator: ``volume * scale + shift`` (z-score with
    the stored statistics plus jitter), then the lateral (W) mirror where ``flip`` (B,) bool is set.

    Pass a training batch's ``flip``: the loader only draws the flips (see ``trainer.augment``). Static shapes:
    both branches are computed and selected, so XLA traces one graph whatever the flags.
    """
    view = (-1,) + (1,) * (volume.ndim - 1)
    x = volume.float() * scale.float().view(view) + shift.float().view(view)
    if flip is None:
        return x
    return torch.where(flip.view(view), x.flip(-1), x)


# ---- the damage budget ----------------------------------------------------------------------------------------


class DamageBudget:
    """The damaged samples one pass may drop: ``fraction`` of the ``expected`` samples it reads. Charged with each
    batch's drops, in the process that receives the batches, it raises as soon as the pass is over budget (so
    ``fraction=0`` stops at the first damaged sample): the pass's total only grows, so waiting for its end would only
    train on more of a damaged set. A damaged sample met again (a worker cycles its shards, or two workers share
    one) counts once."""

    def __init__(self, fraction: float, expected: int, what: str) -> None:
        self.fraction, self.expected, self.what = fraction, expected, what
        self.damaged: dict[tuple[str, str], int] = {}  # (shard, key) -> samples

    @property
    def samples(self) -> int:
        return sum(self.damaged.values())

    def charge(self, dropped: Sequence[stages.Drop]) -> None:
        for drop in dropped:
            self.damaged[(drop.shard, drop.key)] = drop.samples
        if self.samples > self.fraction * self.expected:
            raise DataDamageError(
                f"{self.what}: {self.samples} damaged sample(s) dropped, over data.max_skipped_fraction="
                f"{self.fraction:g} of its {self.expected} samples; damaged shards (samples dropped): "
                f"{self._by_shard()}. The warnings above name each sample; `octjepa verify` checks the whole set. "
                f"Re-run preprocess to repair it, or raise data.max_skipped_fraction to train without them"
            )

    def _by_shard(self) -> str:
        counts: dict[str, int] = {}
        for (shard, _), n in self.damaged.items():
            counts[shard] = counts.get(shard, 0) + n
        return ", ".join(f"{shard} ({n})" for shard, n in sorted(counts.items()))

    def report(self) -> None:
        if self.damaged:
            log.warning(
                "%s: %d damaged sample(s) dropped, within data.max_skipped_fraction=%g of %d: %s",
                self.what,
                self.samples,
                self.fraction,
                self.expected,
                self._by_shard(),
            )


# ---- the per-worker dataset and the host-level loader ------------------------------------------------------------


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker needs to build its stream; picklable, so spawn-started workers work too."""

    cfg: DataConfig
    host_list: tuple[Shard, ...]
    num_batches: int
    batch_size: int
    train: bool
    seed: int
    stream: tuple  # (epoch, host) for train, ("val", host) for validation: seeds every random choice
    start: int = 0  # batches of the epoch already consumed (mid-epoch resume): composed, not read or yielded


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc malloc.h


def _keep_freed_memory() -> None:
    """In the process that runs a training loader, make glibc keep freed batch-sized blocks for reuse instead of
    returning them to the OS.

    By default each batch buffer (tens of MiB) is a fresh mmap, and the page faults plus kernel zeroing of every
    new page cost more than reading the voxels into it. The loader's footprint is bounded by its open batches
    anyway, so holding on to that memory costs nothing. Tuned: loader worker processes, and the main process
    when it runs the training loader itself (``num_workers=0``); the few in-process validation batches are not.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune, the loader is only slower
        log.debug("libc.so.6 not found; malloc left untuned")
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


class _WorkerStream(IterableDataset):
    def __init__(self, spec: _StreamSpec, masks: Any) -> None:
        super().__init__()
        self.spec, self.masks = spec, masks

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        p, cfg = self.spec, self.spec.cfg
        position, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None or p.train:
            _keep_freed_memory()
        # Batch g of the epoch comes from worker g % num_workers. The DataLoader asks its workers in turn from
        # position 0, so after ``start`` batches position 0 must be the worker that makes batch ``start``.
        worker = (position + p.start) % num_workers
        quota = worker_quota(p.num_batches, worker=worker, num_workers=num_workers)
        done = worker_quota(p.start, worker=worker, num_workers=num_workers)  # its batches before ``start``
        if quota == done:
            return iter(())
        shards = worker_shards(
            list(p.host_list),
            worker=worker,
            num_workers=num_workers,
            min_samples=quota * p.batch_size,
            seed=p.seed,
            stream=p.stream,
        )
        stream = (*p.stream, worker)
        counters = stages.Counters()
        balanced = p.train and bool(cfg.domain_weights)
        pipeline: list[Any] = [
            partial(stages.shard_source, shards, seed=p.seed, stream=stream, shuffle=p.train, counters=counters),
            partial(stages.read_shards, counters=counters, defer_volumes=True),
            partial(stages.check_samples, counters=counters),
        ]
        if balanced:
            patience = sum(s.num_samples for s in shards) + cfg.shuffle_buffer
            capacity = max(1, cfg.shuffle_buffer // len(cfg.domain_weights))
            pipeline += [
                partial(stages.materialize, counters=counters),
                partial(
                    stages.balance,
                    weights=cfg.domain_weights,
                    capacity=capacity,
                    patience=patience,
                    rng=random.Random(derive_seed("balance", p.seed, *stream)),
                ),
            ]
        # The shuffle buffer: shuffle_buffer samples' worth of open batches, filled at random slots (see stages).
        shuffled = p.train and not balanced and cfg.shuffle_buffer > 1
        pipeline += [
            partial(
                stages.draw_views,
                crop=cfg.crop_shape,
                flip=cfg.flip_lateral,
                jitter=cfg.intensity_jitter,
                rng=np.random.default_rng(derive_seed("augment", p.seed, *stream)) if p.train else None,
            ),
            partial(
                stages.fill_batches,
                crop=cfg.crop_shape,
                batch_size=p.batch_size,
                open_batches=max(1, math.ceil(cfg.shuffle_buffer / p.batch_size)) if shuffled else 1,
                slot_rng=random.Random(derive_seed("shuffle", p.seed, *stream)) if shuffled else None,
                counters=counters,
                skip_batches=done,
                pack_passes=not balanced,
            ),
            partial(stages.add_masks, masks=self.masks, seed=(p.seed, *stream), first=done),
            partial(stages.add_drops, counters=counters),
        ]
        return islice(iter(wds.DataPipeline(*pipeline)), quota - done)


def _sigterm_from_parent_only(worker_id: int) -> None:
    """A loader worker obeys SIGTERM only from its trainer. A VM being preempted signals every process; the
    trainer then finishes its step and writes a checkpoint, and a worker that died first would crash it mid-step.
    The trainer's own SIGTERM (the DataLoader ending a worker) still ends it at once, as torch's handler would."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before the worker starts any thread: all inherit it

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


class Batches:
    """Exactly ``len(self)`` batches per iteration, from ``num_workers`` loader processes (0: in-process)."""

    def __init__(self, dataset: _WorkerStream, num_batches: int, num_workers: int) -> None:
        # The workers' share of the epoch depends on their count: a resumed epoch keeps it.
        self.num_workers = min(num_workers, num_batches)
        self.dataset, self.num_batches = dataset, num_batches - dataset.spec.start

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        spec = self.dataset.spec
        budget = DamageBudget(
            spec.cfg.max_skipped_fraction,
            spec.num_batches * spec.batch_size,
            what=f"{'training epoch' if spec.train else 'validation'} {spec.stream}",
        )
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,
            worker_init_fn=_sigterm_from_parent_only if self.num_workers else None,
        )
        count = 0
        for batch in loader:
            budget.charge(batch["dropped"])  # here, in the one process that sees every worker's batches
            count += 1
            yield batch
        budget.report()
        if count != self.num_batches:
            # A host that runs fewer steps than the others hangs the pod at the next collective.
            raise RuntimeError(f"loader produced {count} batches, expected exactly {self.num_batches}")


def _split_entry(index: dict, split: str) -> dict:
    if split not in index["splits"]:
        raise ContractError(f"shard set has no split {split!r} (it has {sorted(index['splits'])})")
    entry = index["splits"][split]
    if entry["num_samples"] <= 0:
        raise ContractError(f"split {split!r} of the shard set holds no samples")
    return entry


def split_shards(root: str, index: dict, split: str) -> list[Shard]:
    """The split's shards (URL, sample count, byte size) in index order."""
    entry = _split_entry(index, split)
    urls = shard_urls(root, index, split)
    return [Shard(url, s["num_samples"], s["bytes"]) for url, s in zip(urls, entry["shards"]) if s["num_samples"] > 0]


def check_domain_weights(weights: dict[str, float], index: dict, split: str) -> None:
    """Every device the split holds needs a weight (0 drops it), and every weighted device must be in the split."""
    present = {d: n for d, n in index["counts"]["by_split_device"].get(split, {}).items() if n > 0}
    missing = sorted(set(present) - set(weights))
    unknown = sorted(set(weights) - set(present))
    if missing:
        raise ValueError(
            f"data.domain_weights has no weight for device(s) {missing} of split {split!r} "
            f"(it holds {present}); give each a weight, 0 to leave it out"
        )
    if unknown:
        raise ValueError(
            f"data.domain_weights names device(s) {unknown} that split {split!r} does not hold "
            f"(it holds {sorted(present)})"
        )


def _check_batch(batch_size: int, host_index: int, host_count: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"per-host batch_size must be > 0, got {batch_size}")
    if not 0 <= host_index < host_count:
        raise ValueError(f"host_index {host_index} is outside [0, host_count={host_count})")


def build_train_loader(
    cfg: DataConfig,
    *,
    index: dict,
    batch_size: int,
    masks: Any,
    seed: int,
    epoch: int,
    host_index: int,
    host_count: int,
    start: int = 0,
) -> Batches:
    """One epoch of training batches for this host: ``steps_per_epoch(index, cfg, batch_size * host_count)``
    batches of ``batch_size``, the same count on every host whatever share of the samples its shards hold.

    ``start``: resume the epoch after its first ``start`` batches; the rest are the batches an uninterrupted
    epoch yields from there (the skipped ones are composed from shard headers, their voxels are not read)."""
    _check_batch(batch_size, host_index, host_count)
    if cfg.domain_weights:
        check_domain_weights(cfg.domain_weights, index, cfg.train_split)
    num_batches = steps_per_epoch(index, cfg, batch_size * host_count)
    ordered = epoch_order(split_shards(cfg.shards, index, cfg.train_split), seed=seed, epoch=epoch)
    mine = host_shards(
        ordered,
        host_index=host_index,
        host_count=host_count,
        min_samples=num_batches * batch_size,
        seed=seed,
        epoch=epoch,
    )
    if not 0 <= start <= num_batches:
        raise ValueError(f"start={start} is outside the epoch's [0, {num_batches}] batches")
    spec = _StreamSpec(
        cfg, tuple(mine), num_batches, batch_size, train=True, seed=seed, stream=(epoch, host_index), start=start
    )
    return Batches(_WorkerStream(spec, masks), num_batches, cfg.num_workers)


def build_val_loader(
    cfg: DataConfig, *, index: dict, batch_size: int, masks: Any, seed: int, host_index: int, host_count: int
) -> Batches:
    """``cfg.val_batches`` validation batches on every host, identical on every call: shards in index order, centre
    crop, no flip or jitter, masks from fixed seeds (so ``val/loss`` is comparable across steps and runs)."""
    _check_batch(batch_size, host_index, host_count)
    shards = split_shards(cfg.shards, index, cfg.val_split)
    mine = host_shards(
        shards,
        host_index=host_index,
        host_count=host_count,
        min_samples=cfg.val_batches * batch_size,
        seed=seed,
        epoch=-1,
    )
    spec = _StreamSpec(
        cfg, tuple(mine), cfg.val_batches, batch_size, train=False, seed=seed, stream=("val", host_index)
    )
    # In-process: the few val batches then do not depend on how many workers a run uses, and no processes are
    # forked at every evaluation.
    return Batches(_WorkerStream(spec, masks), cfg.val_batches, num_workers=0)


def iter_eval_batches(
    root: str,
    split: str,
    crop_shape: Sequence[int],
    batch_size: int,
    *,
    max_skipped_fraction: float = DataConfig.max_skipped_fraction,
) -> Iterator[dict]:
    """Every sample of ``split`` that passes its checks once, in index order: centre crop, no augmentation, no
    masks, and the last partial batch kept. Dicts hold ``volume`` (B, 1, D, H, W), ``scale``, ``shift``, ``keys``
    and ``meta``. Damaged samples are dropped and logged; more than ``max_skipped_fraction`` of the split's samples
    raises ``DataDamageError``, as in training."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    index = read_index(root)
    counters = stages.Counters()
    budget = DamageBudget(max_skipped_fraction, _split_entry(index, split)["num_samples"], f"{root} split {split!r}")
    sources = ({"shard": s} for s in split_shards(root, index, split))
    opened = stages.check_samples(stages.read_shards(sources, counters=counters), counters=counters)  # in memory
    samples = stages.augment_all(opened, crop=tuple(crop_shape), rng=None, flip=False, jitter=0.0)
    while group := list(islice(samples, batch_size)):
        budget.charge(counters.take()[1])
        yield {**stages.collate(group), "meta": [g["meta"] for g in group]}
    budget.charge(counters.take()[1])  # the last shard's end is checked after its last sample
    budget.report()


# ---- every validation volume once, in static batches (the trainer's diagnostics) ----------------------------------


def full_val_batches(index: dict, cfg: DataConfig, batch_size: int, host_count: int) -> int:
    """Batches per host that hold every val sample once, from the index alone: the same count on every host
    (the host with the most samples sets it; the others pad)."""
    shards = split_shards(cfg.shards, index, cfg.val_split)
    per_host = [sum(s.num_samples for s in shards[h::host_count]) for h in range(host_count)]
    return max(1, max(math.ceil(n / batch_size) for n in per_host))


def real_samples(scale: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 for a real sample, 0.0 for padding: ``iter_full_val`` pads with scale 0 (an all-zero input), which
    no real sample has (its scale is a / std > 0). Computed on the device, so padding costs no extra tensor."""
    return (scale != 0).float()


def iter_full_val(
    cfg: DataConfig,
    *,
    index: dict,
    batch_size: int,
    masks: Any,
    seed: int,
    host_index: int,
    host_count: int,
    limit: int | None = None,
) -> Iterator[dict]:
    """Every val sample of this host's shards (``shards[host::hosts]``, index order) once: centre crop, no
    augmentation, in exactly ``full_val_batches`` batches of ``batch_size`` (``limit``: only the first ones).

    Static shapes: the last real batch and any batches after it are padded with all-zero samples whose scale is 0
    (see ``real_samples``), so a validation step compiles once; masks come from fixed seeds per batch number.
    Samples that fail the contract are skipped (counted in ``skipped``) and replaced by padding."""
    _check_batch(batch_size, host_index, host_count)
    total = full_val_batches(index, cfg, batch_size, host_count)
    mine = split_shards(cfg.shards, index, cfg.val_split)[host_index::host_count]
    counters = stages.Counters()
    budget = DamageBudget(
        cfg.max_skipped_fraction, sum(s.num_samples for s in mine) or 1, f"{cfg.shards} split {cfg.val_split!r}"
    )
    opened = stages.check_samples(
        stages.read_shards(({"shard": s} for s in mine), counters=counters), counters=counters
    )
    samples = stages.augment_all(opened, crop=cfg.crop_shape, rng=None, flip=False, jitter=0.0)
    dtype = np.dtype(np.uint8)
    for number in range(total if limit is None else min(limit, total)):
        group = list(islice(samples, batch_size))
        if group:
            dtype = np.result_type(dtype, *(g["volume"] for g in group))
        pad = [
            {"volume": np.zeros(cfg.crop_shape, dtype), "view": View("", False, 0.0, 0.0)}
            for _ in range(batch_size - len(group))
        ]
        batch = stages.collate(group + pad)
        generator = torch.Generator().manual_seed(derive_seed("masks", seed, "full-val", host_index, number))
        skipped, dropped = counters.take()
        budget.charge(dropped)
        yield {**batch, "masks": masks(batch_size, generator), "skipped": torch.tensor(skipped)}
