"""Check every shard of a set against its index (sha256, byte size, sample counts, format version) and every sample
against its contract and its CRC32C (a failing sample is reported by key).

    octjepa verify O                 # a shard set written by preprocess (O/index.json)
    octjepa verify O2                # a re-sharded root: verifies every domain set O2/<domain>/
    octjepa verify gs://bucket/O2

Prints a per-domain, per-split, per-device table of samples the index promises against samples found, then every
problem; exits 1 on any problem. Reads each shard once, streaming (a shard is never held whole in memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

from shards import storage
from shards.contract import ContractError, decode_sample
from shards.index import is_root_index, load_any_index, read_index, validate_root_index
from shards.shardset import HashingReader, iter_shard


# ---------------------------------------------------------------------------------------------- the report
@dataclasses.dataclass
class SplitDeviceCount:
    """One line of the table: a device's samples in a split of a domain set, as the index promises and as found."""

    domain: str
    split: str
    device: str
    shards: int
    expected: int
    found: int

    @property
    def ok(self) -> bool:
        return self.expected == self.found


@dataclasses.dataclass
class VerifyReport:
    root: str
    rows: list[SplitDeviceCount] = dataclasses.field(default_factory=list)  # the table
    problems: list[str] = dataclasses.field(default_factory=list)
    shards_checked: int = 0
    samples_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rows)

    def format_table(self) -> str:
        head = ("domain", "split", "device", "shards", "index", "found", "status")
        body = [
            (r.domain, r.split, r.device, str(r.shards), str(r.expected), str(r.found), "ok" if r.ok else "MISMATCH")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = [
            "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in [head, *body]
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        verdict = "OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"
        lines.append(f"{verdict}: {self.samples_checked} samples in {self.shards_checked} shards under {self.root}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checking
def _check_shard(
    url: str, entry: Mapping[str, Any], split: str, report: VerifyReport, found: dict[str, int], seen: dict[str, str]
) -> None:
    """Stream one shard: decode every sample, check its split, count devices, then compare hash, size and count."""
    if not storage.exists(url):
        report.problems.append(f"{url}: shard listed in the index is missing")
        return
    count = 0
    try:
        with storage.open_url(url, "rb") as f:
            reader = HashingReader(f)
            for sample in iter_shard(reader, name=url):
                count += 1
                try:
                    _, meta = decode_sample(sample)
                except ContractError as exc:
                    report.problems.append(f"{url}: {exc}")
                    continue
                if meta["split"] != split:
                    report.problems.append(
                        f"{url}: sample {meta['key']} says split {meta['split']!r}, its shard is in split {split!r}"
                    )
                if meta["key"] in seen:
                    report.problems.append(f"{url}: sample {meta['key']} is duplicated (also in {seen[meta['key']]})")
                seen[meta["key"]] = url
                found[meta["device"]] = found.get(meta["device"], 0) + 1
            reader.drain()
    except ContractError as exc:  # a corrupt or truncated tar: keep checking the other shards
        report.problems.append(str(exc))
    except OSError as exc:
        report.problems.append(f"{url}: cannot be read ({exc})")
        return
    report.shards_checked += 1
    report.samples_checked += count
    if reader.size != entry["bytes"] or reader.digest.hexdigest() != entry["sha256"]:
        report.problems.append(
            f"{url}: content differs from the index (sha256 {reader.digest.hexdigest()[:12]}..., "
            f"{reader.size} bytes; index says {entry['sha256'][:12]}..., {entry['bytes']} bytes)"
        )
    if count != entry["num_samples"]:
        report.problems.append(f"{url}: holds {count} samples, the index says {entry['num_samples']}")


def _verify_set(root: str, domain: str, report: VerifyReport) -> dict[str, int]:
    """Verify one ordinary shard set; returns its samples found per split."""
    try:
        index = read_index(root)
    except (ContractError, ValueError) as exc:
        report.problems.append(str(exc))
        return {}
    seen: dict[str, str] = {}
    found_by_split: dict[str, int] = {}
    expected = index["counts"]["by_split_device"]
    for split in sorted(set(index["splits"]) | set(expected)):
        entry = index["splits"].get(split, {"shards": [], "num_samples": 0})
        found: dict[str, int] = {}
        for shard in entry["shards"]:
            _check_shard(storage.join(root, shard["path"]), shard, split, report, found, seen)
        for device in sorted(set(expected.get(split, {})) | set(found)):
            report.rows.append(
                SplitDeviceCount(
                    domain,
                    split,
                    device,
                    len(entry["shards"]),
                    expected.get(split, {}).get(device, 0),
                    found.get(device, 0),
                )
            )
        found_by_split[split] = sum(found.values())
        if sum(expected.get(split, {}).values()) != entry["num_samples"]:
            report.problems.append(
                f"{root}: split {split!r} lists {entry['num_samples']} samples in its shards but "
                f"{sum(expected.get(split, {}).values())} in counts.by_split_device"
            )
    return found_by_split


def verify_shard_set(root: str) -> VerifyReport:
    """Verify a shard set, or every domain set of a re-sharded root. Never raises for bad content: every problem
    goes into the report (only a root without any ``index.json`` raises, as nothing there can be checked)."""
    report = VerifyReport(root=root)
    top = load_any_index(root)
    if not is_root_index(top):
        _verify_set(root, "-", report)
        return report
    try:
        validate_root_index(top, where=root)
    except ContractError as exc:
        report.problems.append(str(exc))
        return report
    for name, entry in top["domains"].items():
        found = _verify_set(storage.join(root, entry["path"]), name, report)
        if found != entry["by_split"]:
            report.problems.append(
                f"{root}: domain {name!r} by_split {entry['by_split']} in the root index, found {found}"
            )
    return report


def main(argv: list[str] | None = None) -> int:
    """Print the table; 1 when it shows a problem. A root without any index.json raises ContractError, which the
    ``octjepa`` dispatcher prints as one line (exit code 1)."""
    parser = argparse.ArgumentParser(prog="octjepa verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="shard set or re-sharded root (local path or gs://)")
    report = verify_shard_set(parser.parse_args(argv).root)
    print(report.format_table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    import octjepa_cli

    sys.exit(octjepa_cli.main(["verify", *sys.argv[1:]]))
