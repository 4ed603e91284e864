"""``index.json``: what makes a folder a complete shard set, and the index of a re-sharded root.

A shard set's index lists every shard (path, sample count, bytes, sha256) per split, the counts per split and device,
the dead letters' count by reason and the config that produced the set. It is written last (``complete_set``:
``errors.jsonl`` first, then stale shards of an earlier run removed, then ``index.json``), so a folder with one is a
complete set and readers refuse a folder without it.

A re-sharded root's index (``kind: octjepa-reshard-root``, ``build_root_index``) lists its domain sets, each an
ordinary shard set in a folder under it; ``load_any_index`` reads either kind, ``is_root_index`` tells them apart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from shards import storage
from shards.contract import FORMAT_VERSION, SPLITS, ContractError, format_version_error
from shards.shardset import remove_stale_shards

_LOG = logging.getLogger(__name__)
INDEX_NAME = "index.json"
ERRORS_NAME = "errors.jsonl"
ROOT_INDEX_KIND = "octjepa-reshard-root"


# ---------------------------------------------------------------------------------------------- a shard set
def device_counts(devices: Iterable[str]) -> dict[str, int]:
    """A shard entry's ``by_device``: samples per device, sorted by device."""
    counts: dict[str, int] = {}
    for device in devices:
        counts[device] = counts.get(device, 0) + 1
    return dict(sorted(counts.items()))


def build_index(
    *,
    config: Mapping[str, Any],
    shards: Iterable[Mapping[str, Any]],
    by_split_device: Mapping[str, Mapping[str, int]] | None = None,
    errors_by_reason: Mapping[str, int],
    manifest_rows: int,
    selected: int,
    created_by: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble ``index.json``. ``shards`` are dicts with ``split, path, num_samples, bytes, sha256`` and, when
    ``by_split_device`` is not given, ``by_device`` (samples per device in that shard)."""
    shards = sorted(shards, key=lambda s: s["path"])
    if by_split_device is None:
        by_split_device = {}
        for shard in shards:
            counts = by_split_device.setdefault(shard["split"], {})
            for device, n in shard["by_device"].items():
                counts[device] = counts.get(device, 0) + n
    splits: dict[str, dict[str, Any]] = {}
    for shard in shards:
        entry = splits.setdefault(shard["split"], {"num_samples": 0, "shards": []})
        entry["shards"].append({k: shard[k] for k in ("path", "num_samples", "bytes", "sha256")})
        entry["num_samples"] += shard["num_samples"]
    by_device: dict[str, int] = {}
    for devices in by_split_device.values():
        for device, n in devices.items():
            by_device[device] = by_device.get(device, 0) + n
    index = {
        "format_version": FORMAT_VERSION,
        "created_by": created_by,
        "config": dict(config),
        "splits": dict(sorted(splits.items())),
        "counts": {
            "by_split": {s: e["num_samples"] for s, e in sorted(splits.items())},
            "by_device": dict(sorted(by_device.items())),
            "by_split_device": {s: dict(sorted(d.items())) for s, d in sorted(by_split_device.items())},
        },
        "errors": {
            "path": ERRORS_NAME,
            "count": sum(errors_by_reason.values()),
            "by_reason": dict(sorted(errors_by_reason.items())),
        },
        "manifest_rows": manifest_rows,
        "selected": selected,
    }
    if extra:
        index.update(extra)
    validate_index(index, where="<built index>")
    return index


def validate_index(index: Mapping[str, Any], *, where: str) -> None:
    """Check the structure of an index; the message names the shard set and the field."""
    if index.get("format_version") != FORMAT_VERSION:
        raise format_version_error(f"{where}: index field 'format_version'", index.get("format_version"))
    for field in ("config", "splits", "counts", "errors", "manifest_rows", "selected"):
        if field not in index:
            raise ContractError(f"{where}: index is missing field {field!r}")
    for split, entry in index["splits"].items():
        if split not in SPLITS:
            raise ContractError(f"{where}: index split {split!r} is not one of {SPLITS}")
        total = 0
        for shard in entry["shards"]:
            for field in ("path", "num_samples", "bytes", "sha256"):
                if field not in shard:
                    raise ContractError(f"{where}: shard entry {shard!r} is missing field {field!r}")
            total += shard["num_samples"]
        if total != entry["num_samples"]:
            raise ContractError(
                f"{where}: split {split!r} says {entry['num_samples']} samples, its shards hold {total}"
            )


def encode_index(index: Mapping[str, Any]) -> bytes:
    return (json.dumps(index, sort_keys=True, indent=1) + "\n").encode("utf-8")


def write_index(root: str, index: Mapping[str, Any]) -> None:
    """Write ``index.json`` last: a complete set is exactly a set that has one."""
    validate_index(index, where=root)
    storage.write_bytes(storage.join(root, INDEX_NAME), encode_index(index))


def load_any_index(root: str) -> dict[str, Any]:
    """The raw index.json of a shard set or of a re-sharded root; refuses a folder without one."""
    url = storage.join(root, INDEX_NAME)
    if not storage.exists(url):
        raise ContractError(
            f"{root}: no {INDEX_NAME}; this is not a complete shard set (a writer may have been "
            f"interrupted, or the path is wrong)"
        )
    try:
        return json.loads(storage.read_bytes(url))
    except ValueError as exc:
        raise ContractError(f"{url}: not valid JSON ({exc})") from exc


def read_index(root: str) -> dict[str, Any]:
    """Load and validate the index of a shard set; refuse a directory without one (incomplete, or not a set)."""
    index = load_any_index(root)
    validate_index(index, where=root)
    return index


def shard_urls(root: str, index: Mapping[str, Any], split: str) -> list[str]:
    """Full URLs of a split's shards, in index order; raise naming the split when the set has none."""
    if split not in index["splits"]:
        raise ContractError(f"{root}: shard set has no split {split!r} (it has {sorted(index['splits'])})")
    return [storage.join(root, s["path"]) for s in index["splits"][split]["shards"]]


def complete_set(root: str, entries: Iterable[Mapping[str, Any]], *, errors: bytes, **index_fields: Any) -> dict:
    """Make ``root`` a complete set of the shards ``entries`` describe: ``errors.jsonl``, then any shard file not
    among them removed (an earlier run's), then ``index.json``, last. ``index_fields``: ``build_index``'s others."""
    entries = list(entries)
    storage.write_bytes(storage.join(root, ERRORS_NAME), errors)
    removed = remove_stale_shards(root, {e["path"] for e in entries})
    if removed:
        _LOG.info("%s: removed %d stale shard file(s) of an earlier run", root, len(removed))
    index = build_index(shards=entries, **index_fields)
    write_index(root, index)
    return index


# ---------------------------------------------------------------------------------------------- a re-sharded root
def build_root_index(
    *, by: str, domains: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any], created_by: str
) -> dict[str, Any]:
    """The index of a re-sharded root. ``domains`` maps a domain value to ``{path, by_split}`` where ``path`` is the
    domain set's directory relative to the root and ``by_split`` its sample counts."""
    index = {
        "kind": ROOT_INDEX_KIND,
        "format_version": FORMAT_VERSION,
        "created_by": created_by,
        "by": by,
        "config": dict(config),
        "domains": {
            name: {
                "path": d["path"],
                "by_split": dict(sorted(d["by_split"].items())),
                "num_samples": sum(d["by_split"].values()),
            }
            for name, d in sorted(domains.items())
        },
    }
    validate_root_index(index, where="<built root index>")
    return index


def is_root_index(index: Mapping[str, Any]) -> bool:
    return index.get("kind") == ROOT_INDEX_KIND


def validate_root_index(index: Mapping[str, Any], *, where: str) -> None:
    if not is_root_index(index):
        raise ContractError(f"{where}: index field 'kind' is {index.get('kind')!r}, expected {ROOT_INDEX_KIND!r}")
    if index.get("format_version") != FORMAT_VERSION:
        raise format_version_error(f"{where}: index field 'format_version'", index.get("format_version"))
    for field in ("by", "config", "domains"):
        if field not in index:
            raise ContractError(f"{where}: root index is missing field {field!r}")
    for name, entry in index["domains"].items():
        for field in ("path", "by_split", "num_samples"):
            if field not in entry:
                raise ContractError(f"{where}: domain {name!r} is missing field {field!r}")
