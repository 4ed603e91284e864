"""The loader's pipeline stages: generators that one loader worker chains with ``wds.DataPipeline``.

    train, val:  shard_source -> read_shards -> check_samples -> [materialize -> balance] -> draw_views
                 -> fill_batches -> add_masks -> add_drops                     (one ``trainer.batch.Batch`` each)
    eval:        read_shards -> check_samples -> augment_all -> collate       (``trainer.data.iter_eval_batches``)

``fill_batches`` is the shuffle buffer and the batcher in one: it keeps ``open_batches`` batches open and puts each
incoming sample into a uniformly random free slot among them, reading the sample's voxels from the shard file
straight into that slot. A batch leaves as soon as its last slot is filled. So a batch mixes samples from a window
of about ``open_batches x batch_size`` reads, as a shuffle buffer of that size would, and for a volume stored at the
training crop shape (the usual case: preprocessing writes the training shape) the read from the shard is the
loader's only copy of its voxels. A smaller or larger stored volume is read whole, then cropped or padded into its
slot. Batches hold one dtype each (a set mixing uint8 and uint16 volumes gives batches of each; voxel values are
never rescaled); memory is the open batches plus the batches in flight.

An epoch is a pass: when a worker's stream starts its next pass over its shards, ``fill_batches`` first packs the
samples still waiting in partly filled batches into as few batches as they fill (a copy of those few volumes, once a
pass), so every sample of a pass leaves in a batch before more than one batch's worth of the next pass does. Without
it, samples waiting in open batches at the end of an epoch would be left out of it while samples of the next pass fill
its last batches.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from shards import (
    VOLUME_EXT,
    ContractError,
    MemberReader,
    decode_sample,
    decode_sample_header,
    iter_shard,
    storage,
)
from shards.errors import OctjepaError
from trainer.augment import augment, crop_or_pad, draw_view
from trainer.batch import Batch, View, from_views
from trainer.host_split import Shard, cycle_rounds, derive_seed

log = logging.getLogger(__name__)
_NPY_HEAD = 4096  # bytes read ahead of a volume's voxels: numpy writes headers of 64-128 bytes


class DataDamageError(OctjepaError, RuntimeError):
    """More samples were dropped as damaged than ``data.max_skipped_fraction`` allows, or a full pass over a
    worker's shards found none intact; the message names the shards."""

    exit_code = 1


@dataclass(frozen=True)
class Drop:
    """Samples dropped as damaged, reported with the next batch (host-side, never sent to the device)."""

    shard: str
    key: str  # the sample's key; for samples a shard does not hold, which ones ("3 sample(s) after <key>")
    samples: int
    reason: str


@dataclass
class Counters:
    skipped: int = 0  # samples dropped since the last batch
    good: int = 0  # samples whose voxels were read in the current pass over the worker's shards
    dropped: list[Drop] = field(default_factory=list)  # what was dropped since the last batch

    def drop(self, shard: str | None, key: str | None, reason: str) -> None:
        """One sample that failed a check."""
        reason = reason.removeprefix(f"sample {key}: ")  # contract errors start with it; the record has the key
        self._add(Drop(str(shard), str(key), 1, reason), f"sample {key}")

    def lose(self, shard: str, count: int, after: str | None, reason: str) -> None:
        """``count`` samples the index lists that the shard did not yield (their keys are unknown)."""
        what = f"{count} sample(s) after {after or 'its start'}"
        self._add(Drop(shard, what, count, reason), what)

    def _add(self, drop: Drop, what: str) -> None:
        self.skipped += drop.samples
        self.dropped.append(drop)
        log.warning("shard %s: dropped %s: %s", drop.shard, what, drop.reason)

    def take(self) -> tuple[int, list[Drop]]:
        """The drops since the last call, for the next batch."""
        out = self.skipped, self.dropped
        self.skipped, self.dropped = 0, []
        return out


def shard_source(shards: list[Shard], *, seed: int, stream: tuple, shuffle: bool, counters: Counters):
    urls = sorted({s.url for s in shards})
    current = 0
    for round_no, shard in cycle_rounds(shards, seed=seed, stream=stream, shuffle=shuffle):
        if round_no != current:
            # Every sample of the previous pass has been read by now (stages pull one sample at a time, and
            # fill_batches reads a sample's voxels before it pulls the next).
            if counters.good == 0:
                raise DataDamageError(f"no decodable sample in a full pass over shards {urls}; see the warnings above")
            counters.good, current = 0, round_no
        yield {"shard": shard, "round": round_no}


def read_shards(source: Iterable[dict], *, counters: Counters, defer_volumes: bool = False) -> Iterator[dict]:
    """Encoded samples of each shard (``source`` items hold a ``Shard``), the shard held to its index entry: a file
    of another byte size is reported, samples past the index's count are dropped, and a shard that ends early
    (truncated, even exactly between two members, or unreadable from some member on) counts the samples it did
    not yield as dropped. With ``defer_volumes``, a seekable shard's ``.npy`` members come as ``MemberReader``s,
    valid until the next shard is opened: the consumer reads each before pulling the next."""
    defer = (VOLUME_EXT,) if defer_volumes else ()
    for item in source:
        shard: Shard = item["shard"]
        seen, last, failure = 0, None, ""
        try:
            # Opened here, in the worker process: a gcsfs instance is not fork-safe.
            with storage.open_url(shard.url, "rb") as f:
                size = f.seek(0, 2)  # the size the file system already knows: no read
                f.seek(0)
                if size != shard.bytes:
                    failure = f" (the file holds {size} bytes, its index says {shard.bytes})"
                    log.warning(
                        "shard %s holds %d bytes, its index says %d: reading it sample by sample",
                        shard.url,
                        size,
                        shard.bytes,
                    )
                for sample in iter_shard(f, name=shard.url, defer=defer):
                    seen, last = seen + 1, sample["__key__"]
                    if seen > shard.num_samples:
                        counters.drop(shard.url, last, f"past the {shard.num_samples} samples the index lists")
                        continue
                    yield {**sample, "__url__": shard.url, "__round__": item.get("round", 0)}
        except (ContractError, OSError) as exc:
            failure = f": {exc}"
        if seen < shard.num_samples:
            counters.lose(
                shard.url,
                shard.num_samples - seen,
                last,
                f"the shard ends after {seen} of the {shard.num_samples} samples its index lists{failure}",
            )


def check_samples(samples: Iterable[dict], *, counters: Counters) -> Iterator[dict]:
    """Validate each sample from its checksummed metadata and its ``.npy`` header; a deferred volume stays unread
    (``member`` and ``offset`` of its voxels, ``check`` for them once read), an in-memory one is decoded and
    checked (``volume``). A sample that fails is dropped, logged with its shard and key."""
    for sample in samples:
        member = sample.get(VOLUME_EXT)
        try:
            if not isinstance(member, MemberReader):
                volume, meta = decode_sample(sample)
                counters.good += 1
                yield {"volume": volume, "meta": meta, "__round__": sample.get("__round__", 0)}
                continue
            meta, offset, check = decode_sample_header(sample, member.read(0, _NPY_HEAD), member.size)
        except ContractError as exc:
            counters.drop(sample.get("__url__"), sample.get("__key__"), str(exc))
            continue
        yield {
            "member": member,
            "offset": offset,
            "meta": meta,
            "check": check,
            "__url__": sample.get("__url__"),
            "__round__": sample.get("__round__", 0),
        }


def _read_checked(item: dict, dest: np.ndarray, fileobj: Any = None) -> None:
    """Read a deferred volume's voxels into ``dest``, checksummed on the way; ContractError if they fail."""
    check = item["check"]
    check.verify_running(item["member"].readinto(dest, offset=item["offset"], fileobj=fileobj, crc=check.header_crc))


def _read_volume(item: dict, fileobj: Any = None) -> np.ndarray:
    meta = item["meta"]
    volume = np.empty(meta["shape"], dtype=meta["dtype"])
    _read_checked(item, volume, fileobj)
    return volume


def materialize(items: Iterable[dict], *, counters: Counters) -> Iterator[dict]:
    """Read deferred volumes into memory, for stages that hold samples past their shard (domain balancing)."""
    for item in items:
        if "member" in item:
            try:
                item = {"volume": _read_volume(item), "meta": item["meta"], "__round__": item.get("__round__", 0)}
            except ContractError as exc:
                counters.drop(item.get("__url__"), item["meta"]["key"], str(exc))
                continue
            counters.good += 1
        yield item


def balance(
    samples: Iterable[dict], *, weights: dict[str, float], capacity: int, patience: int, rng: random.Random
) -> Iterator[dict]:
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
            log.warning(
                "device %s: no sample in %d reads of this worker's shards; balancing without it", domain, waited
            )
            del active[domain]
            continue
        buf = buffers[domain]
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()
    raise RuntimeError(f"none of the weighted devices {sorted(weights)} has samples in this worker's shards")


def batch_tensor(shape: Sequence[int], dtype: np.dtype) -> torch.Tensor:
    """An uninitialised batch tensor; in a loader worker it lives in shared memory, so the batch reaches the main
    process without the copy that pickling a private tensor would make (as torch's default_collate does)."""
    proto = torch.from_numpy(np.empty(0, dtype))
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=proto.dtype)
    shared = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(shared).view(tuple(shape))


def draw_views(
    items: Iterable[dict], *, crop: Sequence[int], rng: np.random.Generator | None, flip: bool, jitter: float
) -> Iterator[dict]:
    """Draw each sample's training view (``rng=None``: centre crop, no flip or jitter): ``starts`` of its crop and
    its ``view`` (key, flip, scale, shift; applied on the device). The voxels are not touched here."""
    crop = tuple(crop)
    for item in items:
        meta = item["meta"]
        starts, flipped, scale, shift = draw_view(meta["shape"], meta, crop, rng=rng, flip=flip, jitter=jitter)
        yield {**item, "starts": starts, "view": View(meta["key"], flipped, scale, shift)}


@dataclass(eq=False)  # removed from the open list by identity
class _OpenBatch:
    volume: torch.Tensor  # (B, 1, D, H, W)
    free: list[int]
    views: list[View | None] = field(default_factory=list)
    unread: dict[int, dict] = field(default_factory=dict)  # slot -> item placed there while skipping

    @classmethod
    def new(cls, batch_size: int, crop: Sequence[int], dtype: np.dtype) -> _OpenBatch:
        return cls(batch_tensor((batch_size, 1, *crop), dtype), list(range(batch_size)), [None] * batch_size)

    def free_slot(self, slot: int) -> None:
        self.free.append(slot)
        self.views[slot] = None


def _fill(item: dict, dest: np.ndarray, fileobj: Any = None) -> None:
    """Write one sample's training view into its batch slot ``dest`` (D, H, W); ContractError if the voxels read
    fail their checksum (the slot is then free to be filled again)."""
    meta = item["meta"]
    if "member" in item and tuple(meta["shape"]) == dest.shape:
        _read_checked(item, dest, fileobj)  # the only copy of the voxels, checked in the slot before it counts
        return
    volume = item["volume"] if "volume" in item else _read_volume(item, fileobj)
    np.copyto(dest, crop_or_pad(volume, dest.shape, item["starts"]))


def _read_unread(open_batches: Iterable[_OpenBatch], counters: Counters) -> None:
    """Read the voxels of slots filled while skipping, their shards opened again (the stream has moved on); a
    slot whose read fails is freed again, as it would have been when first filled."""
    todo = sorted(
        (
            (item["__url__"], item["offset"], slot, batch)
            for batch in open_batches
            for slot, item in batch.unread.items()
        ),
        key=lambda t: (t[0], t[1]),
    )
    for url, group in itertools.groupby(todo, key=lambda t: t[0]):
        group = list(group)
        try:
            with storage.open_url(url, "rb") as f:
                for _, _, slot, batch in group:
                    item = batch.unread.pop(slot)
                    try:
                        _fill(item, batch.volume.numpy()[slot, 0], fileobj=f)
                    except ContractError as exc:
                        counters.drop(url, item["meta"]["key"], str(exc))
                        batch.free_slot(slot)
        except OSError as exc:  # the shard cannot be opened again: every slot still unread from it is freed
            for _, _, slot, batch in group:
                if slot in batch.unread:
                    item = batch.unread.pop(slot)
                    counters.drop(url, item["meta"]["key"], f"the shard cannot be opened again: {exc}")
                    batch.free_slot(slot)


def _pack(batches: list[_OpenBatch]) -> None:
    """Move the samples of the least filled open batches into the free slots of the most filled ones until at most
    one is partly filled. No random draw: a resumed stream packs exactly as the uninterrupted one did. A slot not
    read yet (a resumed stream's skipped batches) moves as its reference, a read one as a copy of its voxels."""
    while len(partial := [b for b in batches if 0 < len(b.free) < len(b.views)]) > 1:
        partial.sort(key=lambda b: len(b.free))  # most filled first; the sort is stable, so list order breaks ties
        dest, src = partial[0], partial[-1]
        for slot in [i for i, v in enumerate(src.views) if v is not None][: len(dest.free)]:
            to = dest.free.pop(0)
            if slot in src.unread:
                dest.unread[to] = src.unread.pop(slot)
            else:
                dest.volume[to].copy_(src.volume[slot])
            dest.views[to], src.views[slot] = src.views[slot], None
            bisect.insort(src.free, slot)


class _OpenBatches:
    """The open batches of one dtype each (a set mixing uint8 and uint16 volumes gives batches of each)."""

    def __init__(self, crop: tuple[int, ...], batch_size: int, count: int, slot_rng: random.Random | None) -> None:
        self.crop, self.batch_size, self.count, self.slot_rng = crop, batch_size, count, slot_rng
        self.by_dtype: dict[str, list[_OpenBatch]] = {}

    def all(self) -> Iterator[_OpenBatch]:
        return (b for group in self.by_dtype.values() for b in group)

    def slot_for(self, dtype: np.dtype) -> tuple[_OpenBatch, int]:
        """A uniformly random free slot among the open batches of ``dtype`` (``slot_rng=None``: the first free
        slot of the first batch, i.e. arrival order)."""
        batches = self.by_dtype.setdefault(dtype.str, [])
        while len(batches) < self.count:
            batches.append(_OpenBatch.new(self.batch_size, self.crop, dtype))
        if self.slot_rng is None:
            return batches[0], batches[0].free[0]
        pick = self.slot_rng.randrange(sum(len(b.free) for b in batches))
        for batch in batches:
            if pick < len(batch.free):
                break
            pick -= len(batch.free)
        return batch, batch.free[pick]

    def take_full(self, pack: bool = False) -> Iterator[_OpenBatch]:
        """Remove and yield the full batches, after packing the partly filled ones of each dtype (``pack``)."""
        for group in self.by_dtype.values():
            if pack:
                _pack(group)
            for full in [b for b in group if not b.free]:
                group.remove(full)
                yield full


def fill_batches(
    items: Iterable[dict],
    *,
    crop: Sequence[int],
    batch_size: int,
    open_batches: int,
    slot_rng: random.Random | None,
    counters: Counters,
    skip_batches: int = 0,
    pack_passes: bool = False,
) -> Iterator[Batch]:
    """The shuffle buffer and the batcher in one: each sample's voxels are read into a random free slot of
    ``open_batches`` open batches (``slot_rng=None``: slots in arrival order, one batch at a time), and a batch
    leaves as soon as its last slot is filled. Yields ``volume`` (B, 1, *crop) uint8/uint16, ``scale``, ``shift``,
    ``flip`` and ``keys`` (``trainer.batch``); never a partial batch. Items carry ``view`` and ``starts``
    (``draw_views``).

    ``pack_passes``: when the items' pass (``__round__``) changes, the open batches are packed first (``_pack``) and
    those it fills leave, so a pass's samples are not left waiting behind the next pass's.

    ``skip_batches``: the first batches are composed but not yielded, and their voxels are not read (mid-epoch
    resume): every random draw happens as in the full stream, so the batches that follow are the same. Slots still
    open when skipping ends are read (and checked) then. (A sample whose voxels would have failed to read or
    failed their checksum while skipping is not noticed, so only a set with damaged volumes can make the two
    streams differ; damaged metadata is caught while skipping too.)
    """
    open_ = _OpenBatches(tuple(crop), batch_size, open_batches, slot_rng)
    composed, current_pass = 0, None

    def leave(batches: Iterable[_OpenBatch]) -> Iterator[Batch]:
        nonlocal composed
        for batch in batches:
            composed += 1
            if composed > skip_batches:
                yield from_views(batch.volume, batch.views)
            elif composed == skip_batches:
                _read_unread(open_.all(), counters)

    for item in items:
        if pack_passes and item.get("__round__", 0) != current_pass:
            if current_pass is not None:
                yield from leave(open_.take_full(pack=True))
            current_pass = item.get("__round__", 0)
        batch, slot = open_.slot_for(np.dtype(item["meta"]["dtype"]))
        if composed < skip_batches and "member" in item:
            batch.unread[slot] = item
        else:
            try:
                _fill(item, batch.volume.numpy()[slot, 0])
            except ContractError as exc:
                counters.drop(item.get("__url__"), item["meta"]["key"], str(exc))
                continue
        if "member" in item:
            counters.good += 1
        batch.free.remove(slot)
        batch.views[slot] = item["view"]
        if not batch.free:
            yield from leave(open_.take_full())


def add_masks(batches: Iterable[Batch], *, masks: Any, seed: tuple, first: int = 0) -> Iterator[Batch]:
    """Each batch's ``masks``, one [(context, target)] list per batch (``masks=None``: none), seeded by ``seed`` and
    the batch's number in the stream (``first``: the number of the first one, after a resume's skipped batches)."""
    for number, batch in enumerate(batches, start=first):
        generator = torch.Generator().manual_seed(derive_seed("masks", *seed, number))
        yield {**batch, "masks": masks(len(batch["keys"]), generator) if masks is not None else []}


def add_drops(batches: Iterable[Batch], *, counters: Counters) -> Iterator[Batch]:
    """Each batch's ``skipped`` (samples dropped as damaged since the previous batch) and ``dropped`` (their
    ``Drop`` records, host-side)."""
    for batch in batches:
        skipped, dropped = counters.take()
        yield {**batch, "skipped": torch.tensor(skipped, dtype=torch.int64), "dropped": dropped}


def augment_all(
    samples: Iterable[dict], *, crop: Sequence[int], rng: np.random.Generator | None, flip: bool, jitter: float
) -> Iterator[dict]:
    """Each in-memory sample's view applied on the host (evaluation): ``volume`` cropped, ``view``, ``meta``."""
    for s in samples:
        volume, flipped, scale, shift = augment(s["volume"], s["meta"], crop, rng=rng, flip=flip, jitter=jitter)
        yield {"volume": volume, "view": View(s["meta"]["key"], flipped, scale, shift), "meta": s["meta"]}


def collate(group: list[dict]) -> Batch:
    """Stack augmented samples (eval: the last batch may be partial). A set mixing uint8 and uint16 volumes gives
    uint16 batches here; values are never rescaled."""
    volumes = [g["volume"] for g in group]  # crops are views: this stack is their one copy
    out = batch_tensor((len(volumes), 1, *volumes[0].shape), np.result_type(*volumes))
    np.stack(volumes, out=out.numpy()[:, 0])
    return from_views(out, [g["view"] for g in group])
