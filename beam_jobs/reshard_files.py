"""The file work of ``beam_jobs.reshard``, without Beam: scan and check source shards, deal samples into output
shards, write them and the domain indexes. The module docstring of ``beam_jobs.reshard`` describes the job."""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import tarfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shards import (
    CHECKSUM_EXT,
    INDEX_NAME,
    MEMBER_EXTS,
    META_EXT,
    TARGET_SHARD_BYTES,
    VOLUME_EXT,
    ContractError,
    complete_set,
    device_counts,
    read_checksums,
    sha256_of,
    storage,
    validate_meta,
    write_shard_file,
)
from shards.checksum import crc32c
from shards.contract import check_crc

CREATED_BY = "beam_jobs.reshard"


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """Where one sample's bytes are: the npy member by offset in its source shard, the small json and crc32c members
    inline (the crc32c member is copied as it is, and checks the volume's bytes as they are copied)."""

    key: str
    domain: str
    split: str
    device: str
    url: str
    npy_offset: int
    npy_size: int
    meta: bytes
    checksums: bytes


@dataclasses.dataclass(frozen=True)
class ShardWrite:
    """One output shard to write: its refs in key order (possibly none)."""

    domain: str
    split: str
    number: int
    refs: tuple[SampleRef, ...]


def domain_dir(value: str) -> str:
    """Directory name of a domain: the value itself when path-safe, else percent-quoted (injective)."""
    name = urllib.parse.quote(value, safe="")
    if not value or name in (".", ".."):
        raise ContractError(f"domain value {value!r} cannot name a directory")
    return name


def _tar_members(url: str, fileobj: Any) -> dict[str, dict[str, Any]]:
    """key -> {"npy": (data offset, size), "json": bytes, "crc32c": bytes}, reading only tar headers and the small
    members."""
    members: dict[str, dict[str, Any]] = {}
    # Random-access mode seeks over the volume bytes instead of streaming them through tarfile's buffers.
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for info in tar:
            key, dot, ext = info.name.partition(".")
            if not info.isreg() or not dot or ext not in MEMBER_EXTS:
                raise ContractError(f"{url}: unexpected tar member {info.name!r}")
            record = members.setdefault(key, {})
            if ext in record:
                raise ContractError(f"{url}: member {info.name!r} appears twice")
            if ext == VOLUME_EXT:
                record[ext] = (info.offset_data, info.size)
            else:
                record[ext] = tar.extractfile(info).read()
    return members


def scan_shard(url: str, entry: Mapping[str, Any], split: str, by: str) -> list[SampleRef]:
    """Check one source shard's size and structure against its index entry, then return a ref per sample.

    Reads tar headers and json members only; the content (sha256) is ``check_source_shard``'s. Raises ContractError
    naming the shard when it is truncated, unreadable, or disagrees with the index.
    """
    fs, path = storage.get_fs(url)
    try:
        # Small reads: a GCS object is fetched in 64 KiB ranges here.
        with fs.open(path, "rb", block_size=1 << 16) as f:
            size = f.seek(0, 2)  # a tar truncated on a block boundary looks complete to a tar reader
            if size != entry["bytes"]:
                raise ContractError(
                    f"{url}: source shard is truncated or corrupt: {size} bytes, its index says {entry['bytes']}"
                )
            f.seek(0)
            members = _tar_members(url, f)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ContractError(f"{url}: unreadable source shard ({type(exc).__name__}: {exc})") from exc
    if len(members) != entry["num_samples"]:
        raise ContractError(f"{url}: holds {len(members)} samples, its index says {entry['num_samples']}")
    refs = []
    for key, record in sorted(members.items()):
        for ext in MEMBER_EXTS:
            if ext not in record:
                raise ContractError(f"{url}: sample {key} has no {ext!r} member")
        try:
            crcs = read_checksums({"__key__": key, **record})
            check_crc(key, META_EXT, crcs[META_EXT], crc32c(record[META_EXT]))
        except ContractError as exc:
            raise ContractError(f"{url}: source shard is corrupt: {exc}") from exc
        try:
            meta = json.loads(record[META_EXT])
        except ValueError as exc:
            raise ContractError(f"{url}: sample {key}: metadata is not JSON ({exc})") from exc
        try:
            validate_meta(meta)
        except ContractError as exc:
            raise ContractError(f"{url}: {exc}") from exc
        if meta["key"] != key or meta["split"] != split:
            raise ContractError(
                f"{url}: sample {key} says key {meta['key']!r}, split {meta['split']!r}; its shard "
                f"is in split {split!r}"
            )
        value = meta[by]
        if not isinstance(value, str) or not value:
            raise ContractError(f"{url}: sample {key} has no value for field {by!r} ({value!r}); cannot group by it")
        offset, size = record[VOLUME_EXT]
        refs.append(
            SampleRef(key, value, split, meta["device"], url, offset, size, record[META_EXT], record[CHECKSUM_EXT])
        )
    return refs


def check_source_shard(url: str, entry: Mapping[str, Any]) -> None:
    """Hash one source shard to its last byte (streamed, 4 MiB at a time) and compare with its index entry: only
    the checksum catches a flipped byte inside a volume. Raises ContractError naming the shard."""
    fs, path = storage.get_fs(url)
    try:
        with fs.open(path, "rb") as f:
            digest, size = sha256_of(f)
    except OSError as exc:
        raise ContractError(f"{url}: unreadable source shard ({type(exc).__name__}: {exc})") from exc
    if size != entry["bytes"] or digest != entry["sha256"]:
        raise ContractError(
            f"{url}: source shard is corrupt or truncated: {size} bytes, sha256 {digest}; its "
            f"index says {entry['bytes']} bytes, sha256 {entry['sha256']}"
        )


def shard_count(num_samples: int, volume_bytes: int, samples_per_shard: int | None, multiple_of: int) -> int:
    """Shards for one (domain, split): by sample count (or by bytes), at least one, rounded up to a multiple."""
    if samples_per_shard is not None:
        n = math.ceil(num_samples / samples_per_shard)
    else:
        n = math.ceil(volume_bytes / TARGET_SHARD_BYTES)
    return math.ceil(max(n, 1) / multiple_of) * multiple_of


def deal(refs: Iterable[SampleRef], n_shards: int) -> list[list[SampleRef]]:
    """Sorted keys dealt round-robin: shard i holds keys i, i+n, ... (sorted within, counts within one)."""
    ordered = sorted(refs, key=lambda r: r.key)
    for a, b in zip(ordered, ordered[1:]):
        if a.key == b.key:
            raise ContractError(f"sample {a.key} appears twice in the input ({a.url} and {b.url})")
    return [ordered[i::n_shards] for i in range(n_shards)]


def _read_volume_bytes(ref: SampleRef) -> bytes:
    """The volume member's bytes, checked against its stored CRC32C as they are copied (a damaged source sample
    fails the job, naming it, instead of being copied into a set that looks sound)."""
    fs, path = storage.get_fs(ref.url)
    data = fs.cat_file(path, start=ref.npy_offset, end=ref.npy_offset + ref.npy_size)
    if len(data) != ref.npy_size:
        raise ContractError(
            f"{ref.url}: sample {ref.key}: read {len(data)} of {ref.npy_size} volume bytes "
            f"(the shard changed since it was scanned)"
        )
    try:
        stored = read_checksums({"__key__": ref.key, CHECKSUM_EXT: ref.checksums})[VOLUME_EXT]
        check_crc(ref.key, VOLUME_EXT, stored, crc32c(data))
    except ContractError as exc:
        raise ContractError(f"{ref.url}: source shard is corrupt: {exc}") from exc
    return data


def write_domain_shard(output: str, domain: str, split: str, number: int, refs: Sequence[SampleRef]) -> dict[str, Any]:
    """Write one output shard from refs (already in key order); returns its index entry plus ``by_device``."""
    # A generator: one sample's volume bytes are read at a time, straight into the tar stream.
    records = (
        {"__key__": r.key, VOLUME_EXT: _read_volume_bytes(r), META_EXT: r.meta, CHECKSUM_EXT: r.checksums} for r in refs
    )
    entry = write_shard_file(storage.join(output, domain_dir(domain)), split, number, records)
    return {**entry, "by_device": device_counts(ref.device for ref in refs)}


def finalise_domain(
    output: str,
    domain: str,
    entries: Sequence[Mapping[str, Any]],
    *,
    config: Mapping[str, Any],
    source: Mapping[str, Any],
) -> dict[str, Any]:
    """The domain's set completed (an empty errors.jsonl: the source's dead letters stay with the source); returns
    its root-index entry."""
    total = sum(e["num_samples"] for e in entries)
    index = complete_set(
        storage.join(output, domain_dir(domain)),
        entries,
        errors=b"",
        config=config,
        errors_by_reason={},
        manifest_rows=total,
        selected=total,
        created_by=CREATED_BY,
        extra={"domain": {"by": config["reshard"]["by"], "value": domain}, "source": source},
    )
    return {"path": domain_dir(domain), "by_split": index["counts"]["by_split"]}


def retract_indexes(output: str) -> list[str]:
    """Remove the root and domain index.json of an earlier run, so that a run dying midway leaves sets that readers
    refuse rather than indexes describing shards being overwritten."""
    fs, root = storage.get_fs(output)
    fs.invalidate_cache()
    found = fs.glob(posixpath.join(root, "*", INDEX_NAME)) + fs.glob(posixpath.join(root, INDEX_NAME))
    for path in found:
        fs.rm(path)
    return found
