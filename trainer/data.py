"""Streaming loader: shard set (index.json) -> fixed-shape uint8 batches with masks, the same step count on every host.

    index = shards.read_index(cfg.data.shards)                  # refuses a set without index.json
    loader = build_train_loader(cfg.data, index=index, batch_size=per_host_batch, masks=masks, seed=cfg.seed,
                                epoch=epoch, host_index=host, host_count=hosts)
    for batch in loader:                                         # exactly len(loader) batches on every host
        b = {k: batch[k].to(dev) for k in ("volume", "scale", "shift", "flip")}
        x = to_model_input(b["volume"], b["scale"], b["shift"], flip=b["flip"])   # z-score, jitter, lateral flip

Each loader worker runs a webdataset pipeline of small stages:
shard source (explicit host/worker split, cycled) -> open + tar read (``shards.storage.open_url``: fsspec, gcsfs
with retries, opened inside the worker) -> contract decode (failures logged with their key, counted, skipped)
-> shuffle buffer, or per-device buffers when domains are balanced -> crop, draw flip/jitter -> static batches
with masks; the flip and the normalisation are applied on the accelerator by ``to_model_input``. The source
stage is ours, not ``wds.WebDataset``'s ``split_by_node``/``split_by_worker``: those read torch.distributed's
rank, which TPU hosts do not set.
"""
from __future__ import annotations

import ctypes
import logging
import math
import random
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import ContractError, decode_sample, iter_shard, read_index, shard_urls, storage
from trainer.augment import augment
from trainer.host_split import (
    Shard, cycle_rounds, derive_seed, epoch_order, host_shards, worker_quota, worker_shards,
)

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    shards: str = ""  # shard set root (local path or gs://); must hold index.json
    train_split: str = "train"
    val_split: str = "val"
    crop_shape: tuple[int, int, int] = (64, 384, 384)  # (D, H, W); must equal model.encoder.input_shape
    shuffle_buffer: int = 32  # decoded volumes held per worker: this bounds the loader's memory
    num_workers: int = 2
    domain_weights: dict[str, float] = field(default_factory=dict)  # device -> weight; empty = natural mix
    flip_lateral: bool = True
    intensity_jitter: float = 0.1  # relative scale and (z-unit) shift jitter, folded into (scale, shift)
    val_batches: int = 4  # static number of val batches per evaluation, on every host

    def __post_init__(self) -> None:
        self.crop_shape = tuple(self.crop_shape)
        if len(self.crop_shape) != 3 or any(int(c) != c or c <= 0 for c in self.crop_shape):
            raise ValueError(f"data.crop_shape must be three positive ints (D, H, W), got {self.crop_shape!r}")
        for name, low in (("shuffle_buffer", 1), ("num_workers", 0), ("val_batches", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"data.{name} must be >= {low}, got {getattr(self, name)}")
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


def to_model_input(volume: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
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


# ---- pipeline stages (each runs inside one loader worker) ------------------------------------------------------

@dataclass
class _Counters:
    skipped: int = 0  # samples (or unreadable shard tails) skipped since the last batch
    good: int = 0  # samples decoded in the current pass over the worker's shards


def _shard_source(shards: list[Shard], *, seed: int, stream: tuple, shuffle: bool, counters: _Counters):
    urls = sorted({s.url for s in shards})
    current = 0
    for round_no, shard in cycle_rounds(shards, seed=seed, stream=stream, shuffle=shuffle):
        if round_no != current:
            # Every sample of the previous pass has been decoded by now (stages are pulled in order).
            if counters.good == 0:
                raise RuntimeError(f"no decodable sample in a full pass over shards {urls}; see the warnings above")
            counters.good, current = 0, round_no
        yield {"url": shard.url}


def _read_shards(source: Iterable[dict], *, counters: _Counters) -> Iterator[dict]:
    for item in source:
        url = item["url"]
        try:
            # Opened here, in the worker process: a gcsfs instance is not fork-safe.
            with storage.open_url(url, "rb") as f:
                for sample in iter_shard(f, name=url):
                    yield {**sample, "__url__": url}
        except ContractError as exc:
            counters.skipped += 1
            log.warning("skipping the rest of shard %s: %s", url, exc)


def _decode(samples: Iterable[dict], *, counters: _Counters) -> Iterator[dict]:
    for sample in samples:
        try:
            volume, meta = decode_sample(sample)
        except ContractError as exc:
            counters.skipped += 1
            log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), exc)
            continue
        counters.good += 1
        yield {"volume": volume, "meta": meta}


def _balance(samples: Iterable[dict], *, weights: dict[str, float], capacity: int, patience: int,
             rng: random.Random) -> Iterator[dict]:
    """Emit devices in proportion to ``weights``: pick a device, then a random sample from its buffer.

    Buffers are capped, so a dominant device is subsampled (a full buffer has a random entry replaced) instead of
    growing memory while a rare one is awaited. A device not seen within ``patience`` reads is absent from this
    worker's shards; it is dropped here with a warning rather than stalling the stream.
    """
    active = {d: w for d, w in sorted(weights.items()) if w > 0}
    buffers: dict[str, list[dict]] = {d: [] for d in active}
    source = iter(samples)
    while active:
        domain = rng.choices(list(active), weights=list(active.values()))[0]
        waited = 0
        while not buffers[domain] and waited <= patience:
            sample = next(source, None)
            if sample is None:
                return
            waited += 1
            buf = buffers.get(sample["meta"]["device"])
            if buf is None:  # weight 0: this device is left out of the run
                continue
            if len(buf) < capacity:
                buf.append(sample)
            else:
                buf[rng.randrange(capacity)] = sample
        if not buffers[domain]:
            log.warning("device %s: no sample in %d reads of this worker's shards; balancing without it",
                        domain, waited)
            del active[domain]
            continue
        buf = buffers[domain]
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()
    raise RuntimeError(f"none of the weighted devices {sorted(weights)} has samples in this worker's shards")


def _augment(samples: Iterable[dict], *, cfg: DataConfig, rng: np.random.Generator | None) -> Iterator[dict]:
    for s in samples:
        volume, flip, scale, shift = augment(s["volume"], s["meta"], cfg.crop_shape, rng=rng,
                                             flip=cfg.flip_lateral, jitter=cfg.intensity_jitter)
        yield {"key": s["meta"]["key"], "volume": volume, "flip": flip, "scale": scale, "shift": shift,
               "meta": s["meta"]}


def _collate(group: list[dict]) -> dict:
    volumes = [g["volume"] for g in group]  # crops are views: this stack is their one copy
    # A set mixing uint8 and uint16 volumes gives uint16 batches; values are never rescaled.
    proto = torch.from_numpy(np.empty(0, np.result_type(*volumes)))
    shape = (len(volumes), 1, *volumes[0].shape)  # (B, 1, D, H, W)
    if get_worker_info() is None:
        out = torch.empty(shape, dtype=proto.dtype)
    else:
        # Stacked straight into shared memory (as torch's default_collate does in workers), the batch reaches
        # the main process without the extra copy that pickling a private tensor would make.
        storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
        out = proto.new(storage).view(shape)
    np.stack(volumes, out=out.numpy()[:, 0])
    return {
        "volume": out,
        "scale": torch.tensor([g["scale"] for g in group], dtype=torch.float32),
        "shift": torch.tensor([g["shift"] for g in group], dtype=torch.float32),
        "flip": torch.tensor([g["flip"] for g in group], dtype=torch.bool),
        "keys": [g["key"] for g in group],
    }


def _batch(samples: Iterable[dict], *, batch_size: int, masks: Any, mask_seed: tuple,
           counters: _Counters) -> Iterator[dict]:
    source = iter(samples)
    number = 0
    while len(group := list(islice(source, batch_size))) == batch_size:  # never a partial batch: static shapes
        generator = torch.Generator().manual_seed(derive_seed("masks", *mask_seed, number))
        yield {
            **_collate(group),
            "masks": masks(batch_size, generator) if masks is not None else [],
            "skipped": torch.tensor(counters.skipped, dtype=torch.int64),
        }
        counters.skipped = 0
        number += 1


# ---- the per-worker dataset and the host-level loader ------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to build its stream; picklable, so spawn-started workers work too."""
    cfg: DataConfig
    host_list: tuple[Shard, ...]
    num_batches: int
    batch_size: int
    train: bool
    seed: int
    stream: tuple  # (epoch, host) for train, ("val", host) for validation: seeds every random choice


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc malloc.h


def _keep_freed_memory() -> None:
    """In a loader worker, make glibc keep freed volume-sized blocks for reuse instead of returning them to the OS.

    By default each ~10 MiB buffer (tar member, decoded volume) is a fresh mmap, and the page faults plus kernel
    zeroing of every new page cost about as much as the copy itself. The worker's footprint is bounded by the
    shuffle buffer anyway, so holding on to that memory costs nothing; only loader worker processes are tuned.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune, the loader is only slower
        log.debug("libc.so.6 not found; malloc left untuned")
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


class _WorkerStream(IterableDataset):
    def __init__(self, plan: _Plan, masks: Any) -> None:
        super().__init__()
        self.plan, self.masks = plan, masks

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            _keep_freed_memory()
        p, cfg = self.plan, self.plan.cfg
        quota = worker_quota(p.num_batches, worker=worker, num_workers=num_workers)
        if quota == 0:
            return iter(())
        shards = worker_shards(list(p.host_list), worker=worker, num_workers=num_workers,
                               min_samples=quota * p.batch_size, seed=p.seed, stream=p.stream)
        stream = (*p.stream, worker)
        counters = _Counters()
        stages: list[Any] = [
            partial(_shard_source, shards, seed=p.seed, stream=stream, shuffle=p.train, counters=counters),
            partial(_read_shards, counters=counters),
            partial(_decode, counters=counters),
        ]
        if p.train and cfg.domain_weights:
            patience = sum(s.num_samples for s in shards) + cfg.shuffle_buffer
            capacity = max(1, cfg.shuffle_buffer // len(cfg.domain_weights))
            stages.append(partial(_balance, weights=cfg.domain_weights, capacity=capacity, patience=patience,
                                  rng=random.Random(derive_seed("balance", p.seed, *stream))))
        elif p.train and cfg.shuffle_buffer > 1:
            stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer,
                                      rng=random.Random(derive_seed("shuffle", p.seed, *stream))))
        aug_rng = np.random.default_rng(derive_seed("augment", p.seed, *stream)) if p.train else None
        stages.append(partial(_augment, cfg=cfg, rng=aug_rng))
        stages.append(partial(_batch, batch_size=p.batch_size, masks=self.masks, mask_seed=(p.seed, *stream),
                              counters=counters))
        return islice(iter(wds.DataPipeline(*stages)), quota)


class Batches:
    """Exactly ``len(self)`` batches per iteration, from ``num_workers`` loader processes (0: in-process)."""

    def __init__(self, dataset: _WorkerStream, num_batches: int, num_workers: int) -> None:
        self.dataset, self.num_batches = dataset, num_batches
        self.num_workers = min(num_workers, num_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers else None)
        count = 0
        for batch in loader:
            count += 1
            yield batch
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
    """The split's shards (URL + sample count) in index order."""
    entry = _split_entry(index, split)
    urls = shard_urls(root, index, split)
    return [Shard(url, s["num_samples"]) for url, s in zip(urls, entry["shards"]) if s["num_samples"] > 0]


def check_domain_weights(weights: dict[str, float], index: dict, split: str) -> None:
    """Every device the split holds needs a weight (0 drops it), and every weighted device must be in the split."""
    present = {d: n for d, n in index["counts"]["by_split_device"].get(split, {}).items() if n > 0}
    missing = sorted(set(present) - set(weights))
    unknown = sorted(set(weights) - set(present))
    if missing:
        raise ValueError(f"data.domain_weights has no weight for device(s) {missing} of split {split!r} "
                         f"(it holds {present}); give each a weight, 0 to leave it out")
    if unknown:
        raise ValueError(f"data.domain_weights names device(s) {unknown} that split {split!r} does not hold "
                         f"(it holds {sorted(present)})")


def _check_batch(batch_size: int, host_index: int, host_count: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"per-host batch_size must be > 0, got {batch_size}")
    if not 0 <= host_index < host_count:
        raise ValueError(f"host_index {host_index} is outside [0, host_count={host_count})")


def build_train_loader(cfg: DataConfig, *, index: dict, batch_size: int, masks: Any, seed: int, epoch: int,
                       host_index: int, host_count: int) -> Batches:
    """One epoch of training batches for this host: ``steps_per_epoch(index, cfg, batch_size * host_count)``
    batches of ``batch_size``, the same count on every host whatever share of the samples its shards hold."""
    _check_batch(batch_size, host_index, host_count)
    if cfg.domain_weights:
        check_domain_weights(cfg.domain_weights, index, cfg.train_split)
    num_batches = steps_per_epoch(index, cfg, batch_size * host_count)
    ordered = epoch_order(split_shards(cfg.shards, index, cfg.train_split), seed=seed, epoch=epoch)
    mine = host_shards(ordered, host_index=host_index, host_count=host_count,
                       min_samples=num_batches * batch_size, seed=seed, epoch=epoch)
    plan = _Plan(cfg, tuple(mine), num_batches, batch_size, train=True, seed=seed, stream=(epoch, host_index))
    return Batches(_WorkerStream(plan, masks), num_batches, cfg.num_workers)


def build_val_loader(cfg: DataConfig, *, index: dict, batch_size: int, masks: Any, seed: int, host_index: int,
                     host_count: int) -> Batches:
    """``cfg.val_batches`` validation batches on every host, identical on every call: shards in index order, centre
    crop, no flip or jitter, masks from fixed seeds (so ``val/loss`` is comparable across steps and runs)."""
    _check_batch(batch_size, host_index, host_count)
    shards = split_shards(cfg.shards, index, cfg.val_split)
    mine = host_shards(shards, host_index=host_index, host_count=host_count,
                       min_samples=cfg.val_batches * batch_size, seed=seed, epoch=-1)
    plan = _Plan(cfg, tuple(mine), cfg.val_batches, batch_size, train=False, seed=seed, stream=("val", host_index))
    # In-process: the few val batches then do not depend on how many workers a run uses, and no processes are
    # forked at every evaluation.
    return Batches(_WorkerStream(plan, masks), cfg.val_batches, num_workers=0)


def iter_eval_batches(root: str, split: str, crop_shape: Sequence[int], batch_size: int) -> Iterator[dict]:
    """Every decodable sample of ``split`` once, in index order: centre crop, no augmentation, no masks, and the last
    partial batch kept. Dicts hold ``volume`` (B, 1, D, H, W), ``scale``, ``shift``, ``keys`` and ``meta``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    cfg = DataConfig(shards=root, crop_shape=tuple(crop_shape), flip_lateral=False, intensity_jitter=0.0)
    index = read_index(root)
    counters = _Counters()
    sources = ({"url": s.url} for s in split_shards(root, index, split))
    samples = _augment(_decode(_read_shards(sources, counters=counters), counters=counters), cfg=cfg, rng=None)
    while group := list(islice(samples, batch_size)):
        yield {**_collate(group), "meta": [g["meta"] for g in group]}
