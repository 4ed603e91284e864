"""Checks a run makes before its first step, so a bad setting or input costs seconds, not the steps before it.

    index = read_run_index(cfg)                       # data.shards set, index.json present and valid
    check_splits(cfg, index, host_count=hosts)        # train split >= one global micro-batch; val split if validating
    check_shard_files(cfg, index)                     # every shard the run reads exists with its indexed size
    check_resume_data_order(saved, cfg, ...)          # a mid-epoch resume keeps the data order it started with

Every failure is an `OctjepaError` subclass (`ConfigError` for a setting, `ContractError` for the data) with a
message naming the setting or the file, which the `octjepa` dispatcher prints as one line.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from shards import ContractError, read_index, shard_urls, storage
from shards.typed_config import ConfigError
from trainer.config import TrainConfig


def read_run_index(cfg: TrainConfig) -> dict:
    """The shard set's index; refuses an unset `data.shards` and a folder without index.json (incomplete set)."""
    if not cfg.data.shards:
        raise ConfigError("data.shards is not set: pass the shard set root, e.g. data.shards=shards/ or gs://B/shards")
    return read_index(cfg.data.shards)


def _split_samples(index: dict, split: str) -> int:
    entry = index["splits"].get(split)
    return int(entry["num_samples"]) if entry else 0


def check_splits(cfg: TrainConfig, index: dict, *, host_count: int) -> None:
    """The train split holds at least one global micro-batch (a smaller split would fill every batch with repeats
    of the same few samples), and the val split exists when the run validates."""
    micro = cfg.global_batch_size // cfg.grad_accum  # samples per micro-batch, summed over hosts
    have = _split_samples(index, cfg.data.train_split)
    if have == 0:
        raise ConfigError(
            f"data.train_split={cfg.data.train_split!r}: shard set {cfg.data.shards} has no samples "
            f"in that split (its splits: {sorted(index['splits'])})"
        )
    if micro > have:
        raise ConfigError(
            f"global_batch_size / grad_accum = {micro} samples per micro-batch ({host_count} "
            f"host(s)), but split {cfg.data.train_split!r} of {cfg.data.shards} holds only {have}: "
            "lower global_batch_size or raise grad_accum"
        )
    if cfg.val_every > 0 and _split_samples(index, cfg.data.val_split) == 0:
        raise ConfigError(
            f"data.val_split={cfg.data.val_split!r}: shard set {cfg.data.shards} has no samples in "
            f"that split (its splits: {sorted(index['splits'])}), and validation is on "
            f"(val_every={cfg.val_every}); set val_every=0 to train without it"
        )


def check_shard_files(cfg: TrainConfig, index: dict) -> None:
    """Every shard of the splits the run reads exists with the size the index records (one listing per folder),
    so a deleted or cut shard stops the run now rather than at the step that reaches it."""
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.val_every > 0 else [])
    expected: dict[str, int] = {}
    for split in splits:
        for url, entry in zip(shard_urls(cfg.data.shards, index, split), index["splits"][split]["shards"]):
            expected[url] = int(entry["bytes"])
    found: dict[str, int] = {}
    for folder in sorted({posixpath.dirname(u) if storage.is_remote(u) else os.path.dirname(u) for u in expected}):
        found.update(_listing(folder))
    missing = sorted(u for u in expected if u not in found)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ContractError(
            f"shard set {cfg.data.shards} is incomplete: {', '.join(missing[:3])}{more} listed in "
            f"index.json do not exist"
        )
    wrong = sorted(u for u in expected if found[u] != expected[u])
    if wrong:
        u = wrong[0]
        raise ContractError(
            f"shard set {cfg.data.shards}: {u} holds {found[u]} bytes, index.json says "
            f"{expected[u]}" + (f" ({len(wrong) - 1} more shards differ)" if len(wrong) > 1 else "")
        )


def _listing(folder: str) -> dict[str, int]:
    """{url: size} of the files in `folder` (a local directory or a gs:// prefix), URLs spelled as `shard_urls`."""
    fs, path = storage.get_fs(folder)
    if not fs.exists(path):
        return {}
    if storage.is_remote(folder):
        fs.invalidate_cache(path)
    out = {}
    for entry in fs.ls(path, detail=True):
        if entry.get("type") == "file":
            out[storage.join(folder, posixpath.basename(entry["name"].rstrip("/")))] = int(entry["size"])
    return out


def effective_workers(num_workers: int, batches_per_epoch: int) -> int:
    """How many loader streams a host's epoch is split into (0 workers = 1 in-process stream; never more than
    the epoch's batches): the data order of an epoch depends on this number, not on `data.num_workers` itself."""
    return max(1, min(num_workers, batches_per_epoch))


def check_resume_data_order(
    saved_config: dict[str, Any],
    saved_host_count: int | None,
    cfg: TrainConfig,
    *,
    step_in_epoch: int,
    host_count: int,
    batches_per_epoch: int,
    url: str,
) -> None:
    """Refuse a mid-epoch resume whose loader would split the epoch differently than the run that saved it.

    Which samples a host reads in an epoch, and in which order, follow from the number of hosts and of loader
    workers; the rest of a half-done epoch is composed again from the saved count of batches, so with other
    numbers some samples would repeat and others never be seen. At an epoch boundary nothing is half-done."""
    if step_in_epoch == 0:
        return
    then = saved_config.get("data", {}).get("num_workers")
    if then is not None and (
        effective_workers(then, batches_per_epoch) != effective_workers(cfg.data.num_workers, batches_per_epoch)
    ):
        raise ConfigError(
            f"data.num_workers={cfg.data.num_workers}, but checkpoint {url} was saved mid-epoch by a "
            f"run with data.num_workers={then}; the rest of the epoch would repeat some samples and "
            f"skip others. Resume with data.num_workers={then} (or from a checkpoint at an epoch "
            "boundary)"
        )
    hosts_then = saved_host_count
    if hosts_then is not None and hosts_then != host_count:
        raise ConfigError(
            f"this run has {host_count} host(s)/rank(s), but checkpoint {url} was saved mid-epoch by "
            f"a run with {hosts_then}; the rest of the epoch would repeat some samples and skip "
            f"others. Resume with {hosts_then} (or from a checkpoint at an epoch boundary)"
        )
