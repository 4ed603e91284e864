"""Beam job: re-shard a complete shard set into one shard set per domain, copying every sample's bytes untouched.

    octjepa reshard --input O --output O2                                   # one set per device, all devices
    octjepa reshard --input O --output O2 --domains topcon_triton           # the single-domain run
    octjepa reshard --input O --output O2 --by laterality --samples-per-shard 16 --shards-multiple-of 32
    python -m beam_jobs.reshard ...                                         # the same job
    octjepa reshard --input gs://b/O --output gs://b/O2 \\
        --runner DataflowRunner --project P --region us-central1 --temp_location gs://b/tmp

Locally the job runs on Beam's FnApiRunner with one worker thread per core (see LOCAL_RUNNING_MODE); Dataflow takes
the same flags as preprocessing (``beam_jobs.runner``).

Output: ``O2/<domain>/<split>/shard-NNNNNN.tar`` with ``O2/<domain>/index.json`` (each domain directory is an
ordinary shard set: ``shards.read_index("O2/<domain>")`` reads it), and ``O2/index.json`` (``kind:
octjepa-reshard-root``, see ``shards.verify``) listing the domains and their per-split counts. The domain
directory is the field value, percent-quoted if it holds characters unsafe in a path.

The pipeline::

    source shard entries -Reshuffle-> ScanShards (sha256 and size of each shard against the source index, then
      tar member offsets and the small json members only) -> sample refs (key, domain, split, npy byte offset)
      -GroupByKey (domain, split)-> DealIntoShards (sorted keys dealt round-robin) -Reshuffle->
      WriteShards (ranged reads of the npy bytes, one tar each) -GroupByKey domain-> FinaliseDomain
      (errors.jsonl, stale shards removed, index.json) -> FinaliseRoot (O2/index.json, last)

Only references travel through the shuffles, never volume bytes, so memory stays flat however large the input;
each source byte is read twice (checksum pass, then the ranged copy) and written once. ``index.json`` files of an
earlier run in O2 are deleted before the pipeline starts, so a run that dies midway leaves sets readers refuse.
Splits are kept as they are (they are per participant). Shards per (domain, split): ``n = ceil(samples /
samples_per_shard)`` (default: about 256 MB of volumes per shard), rounded up to a multiple of
``--shards-multiple-of K``; dealing sorted keys round-robin keeps every shard within one sample of the others, so
each host x loader worker of a pod gets equal work. A split with fewer samples than K gets K shards, some empty.

Per-domain index: ``config`` is the source's config plus a ``reshard`` section (these options); ``errors`` is an
empty errors.jsonl (the source's dead letters stay with the source); ``manifest_rows`` and ``selected`` are the
domain's sample count (this set's input is exactly those samples), and ``source`` carries the source index's own
``manifest_rows``, ``selected`` and error count.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import posixpath
import sys
import tarfile
import time
import typing
import urllib.parse
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import runner
from shards import (TARGET_SHARD_BYTES, ERRORS_NAME, INDEX_NAME, META_EXT, VOLUME_EXT, ContractError, build_index, encode_index,
                    read_index, remove_stale_shards, storage, validate_meta, write_index,
                    write_shard_file)
from shards.typed_config import ConfigError, from_dict, to_dict
from shards.verify import ROOT_INDEX_KIND, HashingReader, build_root_index, load_any_index

_LOG = logging.getLogger(__name__)
NAMESPACE = "octjepa.reshard"
CREATED_BY = "beam_jobs.reshard"
# Local default, unlike preprocess's processes: re-sharding is file I/O and sha256, which release the GIL, so
# threads run it in parallel without starting a process per worker (each of which, where torch is installed, also
# pays ~7 s for webdataset importing torch). --direct_running_mode on the command line still wins.
LOCAL_RUNNING_MODE = "multi_threading"
# Metadata fields a set can be split by (the domains are their values).
ByField = Literal["device", "anatomic_region", "laterality", "split"]


# ---------------------------------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class ReshardConfig:
    input: str
    output: str
    by: ByField = "device"
    domains: tuple[str, ...] = ()          # empty: every value of the field
    samples_per_shard: int | None = None   # None: about TARGET_SHARD_BYTES of volumes per shard
    shards_multiple_of: int = 1

    def __post_init__(self) -> None:
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.shards_multiple_of < 1:
            raise ConfigError(f"--shards-multiple-of must be >= 1, got {self.shards_multiple_of}")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ConfigError(f"--output must differ from --input ({self.input})")

    def recorded(self) -> dict[str, Any]:
        """What the indexes record: everything that decides the output's bytes (not the output path, so two runs
        into two folders give identical indexes)."""
        return {k: v for k, v in to_dict(self).items() if k != "output"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octjepa reshard", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="complete shard set (with index.json), local or gs://")
    parser.add_argument("--output", required=True, help="folder for the domain sets (rewritten if it exists)")
    parser.add_argument("--by", default="device", choices=typing.get_args(ByField),
                        help="metadata field whose values are the domains")
    parser.add_argument("--domains", default="", help="comma-separated domain values to keep (default: all)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="samples per shard (default: about 256 MB of volumes per shard)")
    parser.add_argument("--shards-multiple-of", type=int, default=1,
                        help="make every split's shard count a multiple of K (hosts x loader workers)")
    return parser


def pipeline_options(beam_args: Sequence[str]) -> Any:
    """``beam_jobs.runner``'s options with this job's local running mode as the default."""
    if not any(arg.startswith("--direct_running_mode") for arg in beam_args):
        beam_args = [f"--direct_running_mode={LOCAL_RUNNING_MODE}", *beam_args]
    return runner.pipeline_options(beam_args, job_name="octjepa-reshard")


# ---------------------------------------------------------------------------------------------------- domain logic
@dataclasses.dataclass(frozen=True)
class SampleRef:
    """Where one sample's bytes are: the npy member by offset in its source shard, the small json member inline."""
    key: str
    domain: str
    split: str
    device: str
    url: str
    npy_offset: int
    npy_size: int
    meta: bytes


def domain_dir(value: str) -> str:
    """Directory name of a domain: the value itself when path-safe, else percent-quoted (injective)."""
    name = urllib.parse.quote(value, safe="")
    if not value or name in (".", ".."):
        raise ContractError(f"domain value {value!r} cannot name a directory")
    return name


def _tar_members(url: str, fileobj: Any) -> dict[str, dict[str, Any]]:
    """key -> {"npy": (data offset, size), "json": bytes}, reading only tar headers and the small json members."""
    members: dict[str, dict[str, Any]] = {}
    # Random-access mode seeks over the volume bytes instead of streaming them through tarfile's buffers.
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for info in tar:
            key, dot, ext = info.name.partition(".")
            if not info.isreg() or not dot or ext not in (VOLUME_EXT, META_EXT):
                raise ContractError(f"{url}: unexpected tar member {info.name!r}")
            record = members.setdefault(key, {})
            if ext in record:
                raise ContractError(f"{url}: member {info.name!r} appears twice")
            if ext == META_EXT:
                record[ext] = tar.extractfile(info).read()
            else:
                record[ext] = (info.offset_data, info.size)
    return members


def scan_shard(url: str, entry: Mapping[str, Any], split: str, by: str) -> list[SampleRef]:
    """Check one source shard against its index entry, then return a ref per sample.

    Raises ContractError naming the shard when it is corrupt, truncated, or disagrees with the index: the job then
    fails before any index is written, instead of producing a silently smaller output.
    """
    fs, path = storage.get_fs(url)
    try:
        # Pass 1, the whole file: only the checksum catches a flipped byte inside a volume, and a tar truncated on
        # a block boundary looks complete to a tar reader.
        with fs.open(path, "rb") as f:
            reader = HashingReader(f)
            reader.drain()
        digest = reader.digest.hexdigest()
        if reader.size != entry["bytes"] or digest != entry["sha256"]:
            raise ContractError(f"{url}: source shard is corrupt or truncated: {reader.size} bytes, sha256 {digest}; "
                                f"its index says {entry['bytes']} bytes, sha256 {entry['sha256']}")
        # Pass 2, headers and json members only (small reads: a GCS object is fetched in 64 KiB ranges here).
        with fs.open(path, "rb", block_size=1 << 16) as f:
            members = _tar_members(url, f)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ContractError(f"{url}: unreadable source shard ({type(exc).__name__}: {exc})") from exc
    if len(members) != entry["num_samples"]:
        raise ContractError(f"{url}: holds {len(members)} samples, its index says {entry['num_samples']}")
    refs = []
    for key, record in sorted(members.items()):
        for ext in (VOLUME_EXT, META_EXT):
            if ext not in record:
                raise ContractError(f"{url}: sample {key} has no {ext!r} member")
        try:
            meta = json.loads(record[META_EXT])
        except ValueError as exc:
            raise ContractError(f"{url}: sample {key}: metadata is not JSON ({exc})") from exc
        try:
            validate_meta(meta)
        except ContractError as exc:
            raise ContractError(f"{url}: {exc}") from exc
        if meta["key"] != key or meta["split"] != split:
            raise ContractError(f"{url}: sample {key} says key {meta['key']!r}, split {meta['split']!r}; its shard "
                                f"is in split {split!r}")
        value = meta[by]
        if not isinstance(value, str) or not value:
            raise ContractError(f"{url}: sample {key} has no value for field {by!r} ({value!r}); cannot group by it")
        offset, size = record[VOLUME_EXT]
        refs.append(SampleRef(key, value, split, meta["device"], url, offset, size, record[META_EXT]))
    return refs


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
    fs, path = storage.get_fs(ref.url)
    data = fs.cat_file(path, start=ref.npy_offset, end=ref.npy_offset + ref.npy_size)
    if len(data) != ref.npy_size:
        raise ContractError(f"{ref.url}: sample {ref.key}: read {len(data)} of {ref.npy_size} volume bytes "
                            f"(the shard changed since it was scanned)")
    return data


def write_domain_shard(output: str, domain: str, split: str, number: int,
                       refs: Sequence[SampleRef]) -> dict[str, Any]:
    """Write one output shard from refs (already in key order); returns its index entry plus ``by_device``."""
    # A generator: one sample's volume bytes are read at a time, straight into the tar stream.
    records = ({"__key__": r.key, VOLUME_EXT: _read_volume_bytes(r), META_EXT: r.meta} for r in refs)
    entry = write_shard_file(storage.join(output, domain_dir(domain)), split, number, records)
    by_device: dict[str, int] = {}
    for ref in refs:
        by_device[ref.device] = by_device.get(ref.device, 0) + 1
    return {**entry, "by_device": dict(sorted(by_device.items()))}


def finalise_domain(output: str, domain: str, entries: Sequence[Mapping[str, Any]], *,
                    config: Mapping[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    """errors.jsonl, stale shards out, then the domain's index.json (last); returns its root-index entry."""
    root = storage.join(output, domain_dir(domain))
    storage.write_bytes(storage.join(root, ERRORS_NAME), b"")
    removed = remove_stale_shards(root, {e["path"] for e in entries})
    if removed:
        _LOG.info("%s: removed %d stale file(s) of an earlier run", root, len(removed))
    total = sum(e["num_samples"] for e in entries)
    index = build_index(
        config=config, shards=entries, errors_by_reason={}, manifest_rows=total, selected=total,
        created_by=CREATED_BY, extra={"domain": {"by": config["reshard"]["by"], "value": domain}, "source": source})
    write_index(root, index)
    return {"path": domain_dir(domain), "by_split": index["counts"]["by_split"]}


def finalise_root(output: str, domains: Mapping[str, Mapping[str, Any]], *, cfg: ReshardConfig,
                  source_config: Mapping[str, Any]) -> dict[str, Any]:
    """O2/index.json, written last: refuses when a requested domain had no sample."""
    missing = sorted(set(cfg.domains) - set(domains))
    if missing:
        raise ContractError(f"{cfg.input}: requested domain(s) {missing} have no samples when grouping by "
                            f"{cfg.by!r}; found {sorted(domains)}. No root index written.")
    index = build_root_index(by=cfg.by, domains=domains, created_by=CREATED_BY,
                             config={"reshard": cfg.recorded(), "source": dict(source_config)})
    storage.write_bytes(storage.join(output, INDEX_NAME), encode_index(index))
    return index


def retract_indexes(output: str) -> list[str]:
    """Remove the root and domain index.json of an earlier run, so that a run dying midway leaves sets that readers
    refuse rather than indexes describing shards being overwritten."""
    fs, root = storage.get_fs(output)
    fs.invalidate_cache()
    found = fs.glob(posixpath.join(root, "*", INDEX_NAME)) + fs.glob(posixpath.join(root, INDEX_NAME))
    for path in found:
        fs.rm(path)
    return found


# ---------------------------------------------------------------------------------------------------- DoFns
class ScanShardFn(beam.DoFn):
    """(split, source shard entry) -> a SampleRef per sample of a kept domain."""

    def __init__(self, source_root: str, by: str, domains: tuple[str, ...]):
        self._root, self._by, self._domains = source_root, by, set(domains)

    def process(self, element: tuple[str, Mapping[str, Any]]) -> Iterator[SampleRef]:
        split, entry = element
        refs = scan_shard(storage.join(self._root, entry["path"]), entry, split, self._by)
        Metrics.counter(NAMESPACE, "source_shards_scanned").inc()
        Metrics.counter(NAMESPACE, "source_samples").inc(len(refs))
        for ref in refs:
            if self._domains and ref.domain not in self._domains:
                Metrics.counter(NAMESPACE, "samples_not_in_kept_domains").inc()
                continue
            yield ref


def deal_into_shards(element: tuple[tuple[str, str], Iterable[SampleRef]], *, samples_per_shard: int | None,
                     multiple_of: int) -> Iterator[tuple[tuple[str, str, int], list[SampleRef]]]:
    (domain, split), refs = element
    refs = list(refs)
    n = shard_count(len(refs), sum(r.npy_size for r in refs), samples_per_shard, multiple_of)
    for number, shard_refs in enumerate(deal(refs, n)):
        yield (domain, split, number), shard_refs  # empty lists too: an empty shard still counts towards K


class WriteShardFn(beam.DoFn):
    """((domain, split, number), refs) -> (domain, index entry with by_device)."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element: tuple[tuple[str, str, int], list[SampleRef]]) -> Iterator[tuple[str, dict]]:
        (domain, split, number), refs = element
        entry = write_domain_shard(self._output, domain, split, number, refs)
        Metrics.counter(NAMESPACE, "shards_written").inc()
        Metrics.counter(NAMESPACE, "samples_written").inc(entry["num_samples"])
        Metrics.counter(NAMESPACE, "bytes_written").inc(entry["bytes"])
        yield domain, entry


class FinaliseDomainFn(beam.DoFn):
    def __init__(self, output: str, config: Mapping[str, Any], source: Mapping[str, Any]):
        self._output, self._config, self._source = output, dict(config), dict(source)

    def process(self, element: tuple[str, Iterable[Mapping[str, Any]]]) -> Iterator[tuple[str, dict]]:
        domain, entries = element
        yield domain, finalise_domain(self._output, domain, list(entries), config=self._config, source=self._source)


class FinaliseRootFn(beam.DoFn):
    def __init__(self, cfg: ReshardConfig, source_config: Mapping[str, Any]):
        self._cfg, self._source_config = cfg, dict(source_config)

    def process(self, output: str, domains: list[tuple[str, dict]]) -> Iterator[dict[str, Any]]:
        yield finalise_root(output, dict(domains), cfg=self._cfg, source_config=self._source_config)


class Reshard(beam.PTransform):
    """Source shard entries -> (domain, root-index entry) per written domain set."""

    def __init__(self, cfg: ReshardConfig, source_index: Mapping[str, Any], source_sha256: str):
        super().__init__()
        self._cfg = cfg
        self._domain_config = {**source_index["config"], "reshard": cfg.recorded()}
        self._source = {"url": cfg.input, "index_sha256": source_sha256,
                        "manifest_rows": source_index["manifest_rows"], "selected": source_index["selected"],
                        "errors": source_index["errors"]["count"]}

    def expand(self, source_shards: beam.PCollection) -> beam.PCollection:
        cfg = self._cfg
        refs = (source_shards
                | "SpreadSourceShards" >> beam.Reshuffle()
                | "ScanShards" >> beam.ParDo(ScanShardFn(cfg.input, cfg.by, cfg.domains)))
        written = (refs
                   | "KeyByDomainSplit" >> beam.Map(lambda ref: ((ref.domain, ref.split), ref))
                   | "GroupByDomainSplit" >> beam.GroupByKey()
                   | "DealIntoShards" >> beam.FlatMap(deal_into_shards, samples_per_shard=cfg.samples_per_shard,
                                                      multiple_of=cfg.shards_multiple_of)
                   # One element per output shard; spread the copying over the workers.
                   | "SpreadShardWrites" >> beam.Reshuffle()
                   | "WriteShards" >> beam.ParDo(WriteShardFn(cfg.output)))
        return (written
                | "GroupByDomain" >> beam.GroupByKey()
                | "FinaliseDomains" >> beam.ParDo(FinaliseDomainFn(cfg.output, self._domain_config, self._source)))


# ---------------------------------------------------------------------------------------------------- run
def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the job to completion; returns ``{"index": root index, "counters", "seconds"}``."""
    args, beam_args = build_parser().parse_known_args(argv)
    cfg = from_dict(ReshardConfig, {
        "input": args.input, "output": args.output, "by": args.by,
        "domains": [d.strip() for d in args.domains.split(",") if d.strip()],
        "samples_per_shard": args.samples_per_shard, "shards_multiple_of": args.shards_multiple_of,
    }, where="octjepa reshard")
    options = pipeline_options(beam_args)
    if load_any_index(cfg.input).get("kind") == ROOT_INDEX_KIND:  # also refuses a folder without index.json
        raise ContractError(f"{cfg.input} is a re-sharded root, not a shard set; pass one of its domain folders")
    source_index = read_index(cfg.input)
    source_sha256 = hashlib.sha256(storage.read_bytes(storage.join(cfg.input, INDEX_NAME))).hexdigest()
    tasks = [(split, shard) for split, entry in sorted(source_index["splits"].items()) for shard in entry["shards"]]

    retract_indexes(cfg.output)
    started = time.monotonic()
    pipeline = runner.make_pipeline(options)
    domains = (pipeline
               | "SourceShards" >> beam.Create(tasks)
               | "Reshard" >> Reshard(cfg, source_index, source_sha256))
    _ = (pipeline
         | "OutputUrl" >> beam.Create([cfg.output])
         | "FinaliseRoot" >> beam.ParDo(FinaliseRootFn(cfg, source_index["config"]),
                                        domains=beam.pvalue.AsList(domains)))
    result = runner.run_and_wait(pipeline)
    seconds = time.monotonic() - started
    index = json.loads(storage.read_bytes(storage.join(cfg.output, INDEX_NAME)))
    return {"index": index, "counters": runner.counters(result, NAMESPACE), "seconds": seconds}


def summary(report: Mapping[str, Any]) -> str:
    index, counters = report["index"], report["counters"]
    lines = [f"reshard by {index['by']}: {counters.get('samples_written', 0)} samples in "
             f"{counters.get('shards_written', 0)} shards, {counters.get('bytes_written', 0) / 1e6:.1f} MB "
             f"in {report['seconds']:.1f} s"]
    lines += [f"  {name:<24} {d['by_split']}  -> {d['path']}/" for name, d in index["domains"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run(argv)
    except ConfigError as exc:
        print(f"octjepa reshard: {exc}", file=sys.stderr)
        return 2
    except ContractError as exc:  # bad input: no index, a corrupt shard, a requested domain with no samples
        print(f"octjepa reshard: {exc}", file=sys.stderr)
        return 1
    print(summary(report), flush=True)
    return 0


if __name__ == "__main__":
    # Re-enter through the package so the DoFns pickle by reference to beam_jobs.reshard, not as __main__ classes.
    from beam_jobs.reshard import main as _main

    sys.exit(_main())
