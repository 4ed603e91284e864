"""The index of a re-sharded root (``kind: octjepa-reshard-root``): the domain sets under it and their counts.

    O2/index.json                 build_root_index(...): by, config, domains {name: {path, by_split, num_samples}}
    O2/<domain>/index.json        an ordinary shard set (``shards.read_index``)

``shards.load_any_index`` reads either kind of index.json; ``kind`` tells them apart.
"""
from __future__ import annotations

from typing import Any, Mapping

from shards.contract import FORMAT_VERSION, ContractError, format_version_error

ROOT_INDEX_KIND = "octjepa-reshard-root"


def build_root_index(*, by: str, domains: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any],
                     created_by: str) -> dict[str, Any]:
    """The index of a re-sharded root. ``domains`` maps a domain value to ``{path, by_split}`` where ``path`` is the
    domain set's directory relative to the root and ``by_split`` its sample counts."""
    index = {
        "kind": ROOT_INDEX_KIND,
        "format_version": FORMAT_VERSION,
        "created_by": created_by,
        "by": by,
        "config": dict(config),
        "domains": {name: {"path": d["path"], "by_split": dict(sorted(d["by_split"].items())),
                           "num_samples": sum(d["by_split"].values())}
                    for name, d in sorted(domains.items())},
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
