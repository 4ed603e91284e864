"""Beam job: re-shard a complete shard set into one shard set per domain, copying every sample's bytes untouched.

    octjepa reshard --input O --output O2                                   # one set per device, all devices
    octjepa reshard --input O --output O2 --domains topcon_triton           # the single-domain run
    octjepa reshard --input O --output O2 --by laterality --samples-per-shard 16 --shards-multiple-of 32
    octjepa reshard --input O --output O2 --by laterality --overwrite     # replace the complete O2 of an earlier run
    python -m beam_jobs.reshard ...                                         # the same job
    octjepa reshard --input gs://b/O --output gs://b/O2 \\
        --runner DataflowRunner --project P --region us-central1 --temp_location gs://b/tmp

Locally the job runs on Beam's FnApiRunner with one worker thread per core (see LOCAL_RUNNING_MODE); Dataflow takes
the same flags as preprocessing (``beam_jobs.runner``).

Output: ``O2/<domain>/<split>/shard-NNNNNN.tar`` with ``O2/<domain>/index.json`` (each domain directory is an
ordinary shard set: ``shards.read_index("O2/<domain>")`` reads it), and ``O2/index.json`` (``kind:
octjepa-reshard-root``, see ``shards.root_index``) listing the domains and their per-split counts. The domain
directory is the field value, percent-quoted if it holds characters unsafe in a path.

The pipeline (the file work itself is in ``beam_jobs.reshard_files``)::

    source shard entries -GroupByKey task-> ScanShards (size against the source index, then tar member offsets
      and the small json members only) -> sample refs (key, domain, split, npy byte offset), and one SourceCheck
      per source shard -GroupByKey (domain, split)-> DealIntoShards (sorted keys dealt round-robin; checks pass
      through) -GroupByKey task-> CopyAndCheck (one output tar from ranged reads of the npy bytes, or one source
      shard's sha256 against the source index) -GroupByKey all-> Finalise (refuses unless every source shard
      passed its check; then per domain errors.jsonl, stale shards removed, index.json; then O2/index.json, last)

Every shuffle is a GroupByKey: on a unique key (a task) it spreads the work over the workers as a Reshuffle would
(Beam's Reshuffle is a GroupByKey on a random key), with fewer transforms and, locally, fewer stages. Only
references travel through the shuffles, never volume bytes, so memory stays flat however large the input. Each
source byte is read twice (the ranged copy, and the checksum pass) and hashed once, each output byte written and
hashed once. The checksum pass is a task beside the shard writes, not a step before them: locally it overlaps
their disk writes, and on Dataflow it spreads like them. A flipped byte therefore fails the job while or after
shards are written, but before any index.json: ``index.json`` files of an earlier run in O2 are deleted before the
pipeline starts, so a run that fails or dies midway leaves sets readers refuse.

Before anything is deleted: ``--output`` must be apart from ``--input`` (not equal, inside or a parent,
``shards.lease.check_separate``); the job takes the output's lease (a second preprocess or reshard into it is
refused, ``shards.lease``); an output holding a complete earlier result needs ``--overwrite``, and one holding a set
this job did not write is refused (``beam_jobs.reshard_output``). Domain folders of an earlier ``--by`` or
``--domains`` are removed at the end, before the root index: a root never sits beside half a domain set.

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
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import sys
import time
import typing
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import runner
from beam_jobs.reshard_output import check_output, remove_stale_domains
from beam_jobs.reshard_files import (CREATED_BY, SampleRef, ShardWrite, SourceCheck, check_source_shard, deal,
                                     finalise_domain, retract_indexes, scan_shard, shard_count, write_domain_shard)
from shards import (INDEX_NAME, ContractError, build_root_index, encode_index, is_root_index, lease, load_any_index,
                    read_index, storage)
from shards.typed_config import ConfigError, from_dict, to_dict

NAMESPACE = "octjepa.reshard"
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
    samples_per_shard: int | None = None   # None: about shards.TARGET_SHARD_BYTES of volumes per shard
    shards_multiple_of: int = 1

    def __post_init__(self) -> None:
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.shards_multiple_of < 1:
            raise ConfigError(f"--shards-multiple-of must be >= 1, got {self.shards_multiple_of}")

    def recorded(self) -> dict[str, Any]:
        """What the indexes record: everything that decides the output's bytes (not the output path, so two runs
        into two folders give identical indexes)."""
        return {k: v for k, v in to_dict(self).items() if k != "output"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octjepa reshard", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="complete shard set (with index.json), local or gs://")
    parser.add_argument("--output", required=True, help="folder for the domain sets, apart from --input")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the complete result of an earlier run that --output holds")
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


# ---------------------------------------------------------------------------------------------------- finalising
def check_requested_domains(cfg: ReshardConfig, domains: Iterable[str]) -> None:
    """Refuse when a requested domain had no sample."""
    missing = sorted(set(cfg.domains) - set(domains))
    if missing:
        raise ContractError(f"{cfg.input}: requested domain(s) {missing} have no samples when grouping by "
                            f"{cfg.by!r}; found {sorted(domains)}. No root index written.")


def finalise_root(output: str, domains: Mapping[str, Mapping[str, Any]], *, cfg: ReshardConfig,
                  source_config: Mapping[str, Any]) -> dict[str, Any]:
    """O2/index.json, written last, after the domain folders of an earlier run are removed: refuses when a requested
    domain had no sample."""
    check_requested_domains(cfg, domains)
    remove_stale_domains(output, {entry["path"] for entry in domains.values()})
    index = build_root_index(by=cfg.by, domains=domains, created_by=CREATED_BY,
                             config={"reshard": cfg.recorded(), "source": dict(source_config)})
    storage.write_bytes(storage.join(output, INDEX_NAME), encode_index(index))
    return index


# ---------------------------------------------------------------------------------------------------- DoFns
def only_one(values: Iterable[Any]) -> Any:
    """The single value grouped under a unique key."""
    (value,) = values
    return value


class ScanShardFn(beam.DoFn):
    """(task number, [(split, source shard entry)]) -> ((domain, split), SampleRef) per sample of a kept domain,
    and ((task number,), SourceCheck) for the shard (a 1-tuple key: never a (domain, split))."""

    def __init__(self, source_root: str, by: str, domains: tuple[str, ...]):
        self._root, self._by, self._domains = source_root, by, set(domains)

    def process(self, element: tuple[int, Iterable[tuple[str, Mapping[str, Any]]]]) -> Iterator[Any]:
        number, (split, entry) = element[0], only_one(element[1])
        url = storage.join(self._root, entry["path"])
        refs = scan_shard(url, entry, split, self._by)
        Metrics.counter(NAMESPACE, "source_shards_scanned").inc()
        Metrics.counter(NAMESPACE, "source_samples").inc(len(refs))
        yield (number,), SourceCheck(url, entry["bytes"], entry["sha256"])
        for ref in refs:
            if self._domains and ref.domain not in self._domains:
                Metrics.counter(NAMESPACE, "samples_not_in_kept_domains").inc()
                continue
            yield (ref.domain, ref.split), ref


def deal_into_shards(element: tuple[tuple, Iterable[SampleRef | SourceCheck]], *, samples_per_shard: int | None,
                     multiple_of: int) -> Iterator[tuple[tuple, ShardWrite | SourceCheck]]:
    """A (domain, split)'s refs -> its ShardWrites; a SourceCheck passes through (to be spread with the writes)."""
    key, refs = element
    if len(key) == 1:
        yield ("check", *key), only_one(refs)
        return
    domain, split = key
    refs = list(refs)
    n = shard_count(len(refs), sum(r.npy_size for r in refs), samples_per_shard, multiple_of)
    for number, shard_refs in enumerate(deal(refs, n)):  # empty ones too: an empty shard still counts towards K
        yield ("write", domain, split, number), ShardWrite(domain, split, number, tuple(shard_refs))


class CopyFn(beam.DoFn):
    """(unique key, [ShardWrite or SourceCheck]) -> (None, ("shard", domain, index entry with by_device)) or
    (None, ("source", url)) once that source shard's checksum matched: one key, so one element gets them all."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element: tuple[tuple, Iterable[ShardWrite | SourceCheck]]) -> Iterator[tuple[None, tuple]]:
        task = only_one(element[1])
        if isinstance(task, SourceCheck):
            check_source_shard(task)
            Metrics.counter(NAMESPACE, "source_shards_checked").inc()
            yield None, ("source", task.url)
            return
        entry = write_domain_shard(self._output, task.domain, task.split, task.number, task.refs)
        Metrics.counter(NAMESPACE, "shards_written").inc()
        Metrics.counter(NAMESPACE, "samples_written").inc(entry["num_samples"])
        Metrics.counter(NAMESPACE, "bytes_written").inc(entry["bytes"])
        yield None, ("shard", task.domain, entry)


class FinaliseFn(beam.DoFn):
    """(None, every CopyFn result) -> the root index: refuses unless every source shard was checked, then writes
    every domain's index.json, then the root's."""

    def __init__(self, cfg: ReshardConfig, config: Mapping[str, Any], source: Mapping[str, Any],
                 source_config: Mapping[str, Any], source_shards: int):
        self._cfg, self._config, self._source = cfg, dict(config), dict(source)
        self._source_config, self._source_shards = dict(source_config), source_shards

    def process(self, element: tuple[None, Iterable[tuple]]) -> Iterator[dict[str, Any]]:
        checked = 0
        by_domain: dict[str, list[dict]] = {}
        for result in element[1]:
            if result[0] == "source":
                checked += 1
            else:
                by_domain.setdefault(result[1], []).append(result[2])
        if checked != self._source_shards:  # cannot happen while a failed check fails the job; never trust it
            raise ContractError(f"{self._cfg.input}: {checked} of {self._source_shards} source shards were checked; "
                                f"no index written")
        check_requested_domains(self._cfg, by_domain)  # before any domain index is written
        # Domains in parallel: each is a few small fsync'ed (or uploaded) files and a listing.
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, len(by_domain)))) as pool:
            written = pool.map(lambda item: finalise_domain(self._cfg.output, *item, config=self._config,
                                                            source=self._source), sorted(by_domain.items()))
            domains = dict(zip(sorted(by_domain), written))
        yield finalise_root(self._cfg.output, domains, cfg=self._cfg, source_config=self._source_config)


class Reshard(beam.PTransform):
    """The whole job, from the source index: yields the root index (nothing for a source set without shards)."""

    def __init__(self, cfg: ReshardConfig, source_index: Mapping[str, Any], source_sha256: str):
        super().__init__()
        self._cfg = cfg
        self._tasks = [(split, shard) for split, entry in sorted(source_index["splits"].items())
                       for shard in entry["shards"]]
        self._domain_config = {**source_index["config"], "reshard": cfg.recorded()}
        self._source_config = source_index["config"]
        self._source = {"url": cfg.input, "index_sha256": source_sha256,
                        "manifest_rows": source_index["manifest_rows"], "selected": source_index["selected"],
                        "errors": source_index["errors"]["count"]}

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        # Every shuffle is a GroupByKey on a key that spreads the work (a source shard, a copy task) or gathers it
        # (a (domain, split), everything): the fusion breaks Reshuffles would give, in fewer transforms and stages
        # (a Reshuffle, beam.Create's own included, is a composite of six transforms).
        cfg = self._cfg
        return (pbegin
                | "Start" >> beam.Impulse()
                | "SourceShards" >> beam.FlatMap(lambda _, tasks: enumerate(tasks), self._tasks)
                | "SpreadSourceShards" >> beam.GroupByKey()
                | "ScanShards" >> beam.ParDo(ScanShardFn(cfg.input, cfg.by, cfg.domains))
                | "GroupByDomainSplit" >> beam.GroupByKey()
                | "DealIntoShards" >> beam.FlatMap(deal_into_shards, samples_per_shard=cfg.samples_per_shard,
                                                   multiple_of=cfg.shards_multiple_of)
                | "SpreadCopyTasks" >> beam.GroupByKey()
                | "CopyAndCheck" >> beam.ParDo(CopyFn(cfg.output))
                | "GatherResults" >> beam.GroupByKey()
                | "Finalise" >> beam.ParDo(FinaliseFn(cfg, self._domain_config, self._source, self._source_config,
                                                      len(self._tasks))))


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
    runner.check_dataflow(options, input=cfg.input, output=cfg.output)
    lease.check_separate(cfg.input, cfg.output)
    if is_root_index(load_any_index(cfg.input)):  # also refuses a folder without index.json
        raise ContractError(f"{cfg.input} is a re-sharded root, not a shard set; pass one of its domain folders")
    source_index = read_index(cfg.input)
    source_sha256 = hashlib.sha256(storage.read_bytes(storage.join(cfg.input, INDEX_NAME))).hexdigest()

    with lease.hold(cfg.output, job="reshard") as held:
        check_output(cfg.output, overwrite=args.overwrite)
        retract_indexes(cfg.output)
        started = time.monotonic()
        pipeline = runner.make_pipeline(options)
        _ = pipeline | "Reshard" >> Reshard(cfg, source_index, source_sha256)
        result = run_reporting_contract_errors(pipeline, on_signal=held.release)
        if not any(entry["shards"] for entry in source_index["splits"].values()):  # nothing reached Finalise
            finalise_root(cfg.output, {}, cfg=cfg, source_config=source_index["config"])
        seconds = time.monotonic() - started
        index = json.loads(storage.read_bytes(storage.join(cfg.output, INDEX_NAME)))
    return {"index": index, "counters": runner.counters(result, NAMESPACE), "seconds": seconds}


def run_reporting_contract_errors(pipeline: beam.Pipeline, **kwargs: Any) -> Any:
    """``runner.run_and_wait``, with a ContractError raised by a worker raised again as itself: Beam's threaded and
    multi-process local runners re-raise it as a RuntimeError that keeps only its traceback text."""
    try:
        return runner.run_and_wait(pipeline, **kwargs)
    except RuntimeError as exc:
        reason = worker_contract_error(str(exc))
        if reason is None:
            raise
        raise ContractError(reason) from None


def summary(report: Mapping[str, Any]) -> str:
    index, counters = report["index"], report["counters"]
    lines = [f"reshard by {index['by']}: {counters.get('samples_written', 0)} samples in "
             f"{counters.get('shards_written', 0)} shards, {counters.get('bytes_written', 0) / 1e6:.1f} MB "
             f"in {report['seconds']:.1f} s"]
    lines += [f"  {name:<24} {d['by_split']}  -> {d['path']}/" for name, d in index["domains"].items()]
    return "\n".join(lines)


def worker_contract_error(text: str) -> str | None:
    """The ContractError a worker raised, from the text of the RuntimeError that Beam's threaded and multi-process
    local runners re-raise it as (they keep only its traceback text); None if there is none."""
    marker = f"{ContractError.__module__}.{ContractError.__name__}: "
    lines = [line.split(marker, 1)[1] for line in text.splitlines() if marker in line]
    return lines[-1].strip() if lines else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run and print the summary; user errors (OctjepaError) propagate to the ``octjepa`` dispatcher."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(argv)
    print(summary(report), flush=True)
    return 0


if __name__ == "__main__":
    # Through the dispatcher, for its one-line errors; it imports beam_jobs.reshard, so the DoFns pickle by
    # reference to that module, not as __main__ classes.
    import octjepa_cli

    sys.exit(octjepa_cli.main(["reshard", *sys.argv[1:]]))
