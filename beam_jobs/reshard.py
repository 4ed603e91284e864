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
octjepa-reshard-root``, see ``shards.index``) listing the domains and their per-split counts. The domain
directory is the field value, percent-quoted if it holds characters unsafe in a path.

The pipeline (the file work itself is in ``beam_jobs.reshard_files``)::

    source shard entries -GroupByKey task-> ScanAndCheck (size and sha256 against the source index, tar member
      offsets, the small json members) -> sample refs (key, domain, split, npy byte offset)
      -GroupByKey (domain, split)-> DealIntoShards (sorted keys dealt round-robin) -GroupByKey task-> WriteShards
      (one output tar from ranged reads of the npy bytes, each volume checked against its CRC32C as it is copied)
    shard entries + source shards checked + problems -Finalise-> per domain errors.jsonl, stale shards removed,
      index.json; then O2/index.json, last

Every shuffle is a GroupByKey: on a unique key (a task) it spreads the work over the workers as a Reshuffle would
(Beam's Reshuffle is a GroupByKey on a random key), with fewer transforms and, locally, fewer stages. Only
references travel through the shuffles, never volume bytes, so memory stays flat however large the input. Each
source byte is read twice (the checksum pass of the scan, and the ranged copy), each output byte written and hashed
once. A damaged source shard is found before any shard is written: no shard is dealt once a scan has failed.

A contract problem a worker finds (a corrupt or truncated source shard, a volume failing its CRC32C, a duplicate
key, a requested domain without samples) is routed as data (tagged outputs), never raised there: Finalise then
writes no index but the problems, to ``O2/failed-run-errors.jsonl`` (``beam_jobs.job``), and the driver raises the
first as a ContractError naming its shard. ``index.json`` files of an earlier run in O2 are deleted before the
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
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import job, runner
from beam_jobs.reshard_files import (
    CREATED_BY,
    SampleRef,
    ShardWrite,
    check_source_shard,
    deal,
    finalise_domain,
    retract_indexes,
    scan_shard,
    shard_count,
    write_domain_shard,
)
from beam_jobs.reshard_output import check_output, remove_stale_domains
from shards import (
    INDEX_NAME,
    ContractError,
    build_root_index,
    encode_index,
    is_root_index,
    lease,
    load_any_index,
    read_index,
    storage,
)
from shards.typed_config import ConfigError, from_dict, to_dict

NAMESPACE = "octjepa.reshard"
# Local default, unlike preprocess's processes: re-sharding is file I/O and sha256, which release the GIL, so
# threads run it in parallel without starting a process per worker (each of which, where torch is installed, also
# pays ~7 s for webdataset importing torch). --direct_running_mode on the command line still wins.
LOCAL_RUNNING_MODE = "multi_threading"
CHECKED_TAG = "checked"
PROBLEMS_TAG = "problems"
# Metadata fields a set can be split by (the domains are their values).
ByField = Literal["device", "anatomic_region", "laterality", "split"]


# ---------------------------------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class ReshardOptions:
    input: str
    output: str
    by: ByField = "device"
    domains: tuple[str, ...] = ()  # empty: every value of the field
    samples_per_shard: int | None = None  # None: about shards.TARGET_SHARD_BYTES of volumes per shard
    shards_multiple_of: int = 1
    overwrite: bool = False  # replace the complete result of an earlier run

    def __post_init__(self) -> None:
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.shards_multiple_of < 1:
            raise ConfigError(f"--shards-multiple-of must be >= 1, got {self.shards_multiple_of}")

    def recorded(self) -> dict[str, Any]:
        """What the indexes record: everything that decides the output's bytes (not the output path, so two runs
        into two folders give identical indexes)."""
        return {k: v for k, v in to_dict(self).items() if k not in ("output", "overwrite")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="octjepa reshard",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="complete shard set (with index.json), local or gs://")
    parser.add_argument("--output", required=True, help="folder for the domain sets, apart from --input")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the complete result of an earlier run that --output holds"
    )
    parser.add_argument(
        "--by", default="device", choices=typing.get_args(ByField), help="metadata field whose values are the domains"
    )
    parser.add_argument("--domains", default="", help="comma-separated domain values to keep (default: all)")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help="samples per shard (default: about 256 MB of volumes per shard)",
    )
    parser.add_argument(
        "--shards-multiple-of",
        type=int,
        default=1,
        help="make every split's shard count a multiple of K (hosts x loader workers)",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> tuple[ReshardOptions, list[str]]:
    """The job's options, validated; and the rest of ``argv`` (Beam's pipeline options)."""
    args, beam_args = build_parser().parse_known_args(argv)
    fields = {**vars(args), "domains": [d.strip() for d in args.domains.split(",") if d.strip()]}
    return from_dict(ReshardOptions, fields, where="octjepa reshard"), beam_args


def pipeline_options(beam_args: Sequence[str]) -> Any:
    """``beam_jobs.runner``'s options with this job's local running mode as the default."""
    if not any(arg.startswith("--direct_running_mode") for arg in beam_args):
        beam_args = [f"--direct_running_mode={LOCAL_RUNNING_MODE}", *beam_args]
    return runner.pipeline_options(beam_args, job_name="octjepa-reshard")


# ---------------------------------------------------------------------------------------------------- finalising
def finalise(
    opts: ReshardOptions,
    entries: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    problems: list[dict],
    domain_config: Mapping[str, Any],
    source: Mapping[str, Any],
    source_config: Mapping[str, Any],
) -> dict[str, Any] | None:
    """Complete every domain set, remove the domain folders of an earlier run, write the root's index.json (last) and
    return it. When the run found problems, or a requested domain had no sample, write only those (to the failed-run
    file, ``beam_jobs.job``) and return None."""
    by_domain: dict[str, list[Mapping[str, Any]]] = {}
    for domain, entry in entries:
        by_domain.setdefault(domain, []).append(entry)
    missing = sorted(set(opts.domains) - set(by_domain))
    if missing:
        problems = [
            *problems,
            {
                "stage": "finalise",
                "message": (
                    f"{opts.input}: requested domain(s) {missing} have no samples when grouping by {opts.by!r}; found "
                    f"{sorted(by_domain)}"
                ),
            },
        ]
    if problems:
        job.write_failed_run(opts.output, sorted(problems, key=lambda p: (p["message"], p["stage"])))
        return None
    # Domains in parallel: each is a few small fsync'ed (or uploaded) files and a listing.
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, len(by_domain)))) as pool:
        written = pool.map(
            lambda item: finalise_domain(opts.output, *item, config=domain_config, source=source),
            sorted(by_domain.items()),
        )
        domains = dict(zip(sorted(by_domain), written))
    job.clear_failed_run(opts.output)
    remove_stale_domains(opts.output, {entry["path"] for entry in domains.values()})
    index = build_root_index(
        by=opts.by,
        domains=domains,
        created_by=CREATED_BY,
        config={"reshard": opts.recorded(), "source": dict(source_config)},
    )
    storage.write_bytes(storage.join(opts.output, INDEX_NAME), encode_index(index))
    return index


def problems_error(output: str, problems: list[dict[str, Any]]) -> ContractError:
    """The error of a run that found problems: the first, and where every one is."""
    first = problems[0]["message"] if problems else "no problem recorded"
    return ContractError(
        f"{first} ({len(problems)} problem(s) in all, each in "
        f"{storage.join(output, job.FAILED_RUN_ERRORS)}); no index.json written"
    )


# ---------------------------------------------------------------------------------------------------- DoFns
def only_one(values: Iterable[Any]) -> Any:
    """The single value grouped under a unique key."""
    (value,) = values
    return value


def problem(stage: str, exc: ContractError) -> beam.pvalue.TaggedOutput:
    """A contract failure found by a worker, as data for Finalise."""
    Metrics.counter(NAMESPACE, f"problems_{stage}").inc()
    return beam.pvalue.TaggedOutput(PROBLEMS_TAG, {"stage": stage, "message": str(exc)})


class ScanShardFn(beam.DoFn):
    """(task number, [(split, source shard entry)]) -> ((domain, split), SampleRef) per sample of a kept domain,
    once the shard's size, tar structure and sha256 match its index entry; its URL to CHECKED_TAG. A shard that
    does not match goes to PROBLEMS_TAG, and none of its samples goes on."""

    def __init__(self, source_root: str, by: str, domains: tuple[str, ...]):
        self._root, self._by, self._domains = source_root, by, set(domains)

    def process(self, element: tuple[int, Iterable[tuple[str, Mapping[str, Any]]]]) -> Iterator[Any]:
        split, entry = only_one(element[1])
        url = storage.join(self._root, entry["path"])
        try:
            refs = scan_shard(url, entry, split, self._by)
            Metrics.counter(NAMESPACE, "source_shards_scanned").inc()
            check_source_shard(url, entry)
        except ContractError as exc:
            yield problem("scan", exc)
            return
        Metrics.counter(NAMESPACE, "source_shards_checked").inc()
        Metrics.counter(NAMESPACE, "source_samples").inc(len(refs))
        yield beam.pvalue.TaggedOutput(CHECKED_TAG, url)
        for ref in refs:
            if self._domains and ref.domain not in self._domains:
                Metrics.counter(NAMESPACE, "samples_not_in_kept_domains").inc()
                continue
            yield (ref.domain, ref.split), ref


def deal_into_shards(
    element: tuple[tuple[str, str], Iterable[SampleRef]],
    *,
    samples_per_shard: int | None,
    multiple_of: int,
    scan_problems: list[dict],
) -> Iterator[Any]:
    """A (domain, split)'s refs -> its ShardWrites, each under its own key; none once a source shard failed its scan
    (no index will be written: copying would be wasted)."""
    if scan_problems:
        return
    (domain, split), refs = element[0], list(element[1])
    n = shard_count(len(refs), sum(r.npy_size for r in refs), samples_per_shard, multiple_of)
    try:
        dealt = deal(refs, n)
    except ContractError as exc:
        yield problem("deal", exc)
        return
    for number, shard_refs in enumerate(dealt):  # empty ones too: an empty shard still counts towards K
        yield (domain, split, number), ShardWrite(domain, split, number, tuple(shard_refs))


class WriteShardFn(beam.DoFn):
    """(task key, [ShardWrite]) -> (domain, index entry with by_device); a volume that fails its CRC32C as it is
    copied goes to PROBLEMS_TAG instead (its shard is not written)."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element: tuple[tuple, Iterable[ShardWrite]]) -> Iterator[Any]:
        task = only_one(element[1])
        try:
            entry = write_domain_shard(self._output, task.domain, task.split, task.number, task.refs)
        except ContractError as exc:
            yield problem("copy", exc)
            return
        Metrics.counter(NAMESPACE, "shards_written").inc()
        Metrics.counter(NAMESPACE, "samples_written").inc(entry["num_samples"])
        Metrics.counter(NAMESPACE, "bytes_written").inc(entry["bytes"])
        yield task.domain, entry


class FinaliseFn(beam.DoFn):
    """(one impulse) -> the root index (``finalise``), once every shard is written and every source shard checked."""

    def __init__(self, opts: ReshardOptions, source_shards: int, **context: Mapping[str, Any]):
        self._opts, self._source_shards, self._context = opts, source_shards, context

    def process(
        self, _: bytes, entries: list[tuple[str, dict]], checked: list[str], problems: list[dict]
    ) -> Iterator[dict[str, Any]]:
        # Every scan either checks its shard or reports a problem, so this cannot happen; never trust the index to it.
        if not problems and len(set(checked)) != self._source_shards:
            problems = [
                {
                    "stage": "finalise",
                    "message": f"{self._opts.input}: {len(set(checked))} of "
                    f"{self._source_shards} source shards were checked",
                }
            ]
        index = finalise(self._opts, entries, problems=list(problems), **self._context)
        if index is not None:
            yield index


class Reshard(beam.PTransform):
    """The whole job, from the source index: yields the root index (nothing when the run found problems)."""

    def __init__(self, opts: ReshardOptions, source_index: Mapping[str, Any], source_sha256: str):
        super().__init__()
        self._opts = opts
        self._tasks = [
            (split, shard) for split, entry in sorted(source_index["splits"].items()) for shard in entry["shards"]
        ]
        self._context = {
            "domain_config": {**source_index["config"], "reshard": opts.recorded()},
            "source_config": source_index["config"],
            "source": {
                "url": opts.input,
                "index_sha256": source_sha256,
                "manifest_rows": source_index["manifest_rows"],
                "selected": source_index["selected"],
                "errors": source_index["errors"]["count"],
            },
        }

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        # Every shuffle is a GroupByKey on a key that spreads the work (a source shard, a shard to write) or gathers
        # it (a (domain, split)): the fusion breaks Reshuffles would give, in fewer transforms and stages (a
        # Reshuffle, beam.Create's own included, is a composite of six transforms).
        opts = self._opts
        scanned = (
            pbegin
            | "Start" >> beam.Impulse()
            | "SourceShards" >> beam.FlatMap(lambda _, tasks: enumerate(tasks), self._tasks)
            | "SpreadSourceShards" >> beam.GroupByKey()
            | "ScanAndCheck"
            >> beam.ParDo(ScanShardFn(opts.input, opts.by, opts.domains)).with_outputs(
                CHECKED_TAG, PROBLEMS_TAG, main="refs"
            )
        )
        dealt = (
            scanned.refs
            | "GroupByDomainSplit" >> beam.GroupByKey()
            | "DealIntoShards"
            >> beam.FlatMap(
                deal_into_shards,
                samples_per_shard=opts.samples_per_shard,
                multiple_of=opts.shards_multiple_of,
                scan_problems=beam.pvalue.AsList(scanned[PROBLEMS_TAG]),
            ).with_outputs(PROBLEMS_TAG, main="writes")
        )
        written = (
            dealt.writes
            | "SpreadShardWrites" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShardFn(opts.output)).with_outputs(PROBLEMS_TAG, main="entries")
        )
        problems = (scanned[PROBLEMS_TAG], dealt[PROBLEMS_TAG], written[PROBLEMS_TAG]) | "Problems" >> beam.Flatten()
        return (
            pbegin
            | "Finish" >> beam.Impulse()
            | "Finalise"
            >> beam.ParDo(
                FinaliseFn(opts, len(self._tasks), **self._context),
                entries=beam.pvalue.AsList(written.entries),
                checked=beam.pvalue.AsList(scanned[CHECKED_TAG]),
                problems=beam.pvalue.AsList(problems),
            )
        )


# ---------------------------------------------------------------------------------------------------- run
def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the job to completion; returns ``{"index": root index, "counters", "seconds"}``."""
    opts, beam_args = parse_options(argv)
    options = pipeline_options(beam_args)
    runner.check_dataflow(options, input=opts.input, output=opts.output)
    lease.check_separate(opts.input, opts.output)
    if is_root_index(load_any_index(opts.input)):  # also refuses a folder without index.json
        raise ContractError(f"{opts.input} is a re-sharded root, not a shard set; pass one of its domain folders")
    source_index = read_index(opts.input)
    source_sha256 = hashlib.sha256(storage.read_bytes(storage.join(opts.input, INDEX_NAME))).hexdigest()

    with lease.hold(opts.output, job="reshard") as held:
        check_output(opts.output, overwrite=opts.overwrite)
        retract_indexes(opts.output)
        counters, seconds = job.run_pipeline(
            options,
            lambda pipeline: pipeline | "Reshard" >> Reshard(opts, source_index, source_sha256),
            on_signal=held.release,
            namespace=NAMESPACE,
        )
        index = job.read_result(opts.output, lambda problems: problems_error(opts.output, problems))
    return {"index": index, "counters": counters, "seconds": seconds}


def summary(report: Mapping[str, Any]) -> str:
    index, counters = report["index"], report["counters"]
    lines = [
        f"reshard by {index['by']}: {counters.get('samples_written', 0)} samples in "
        f"{counters.get('shards_written', 0)} shards, {counters.get('bytes_written', 0) / 1e6:.1f} MB "
        f"in {report['seconds']:.1f} s"
    ]
    lines += [f"  {name:<24} {d['by_split']}  -> {d['path']}/" for name, d in index["domains"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return job.main(run, summary, argv)


if __name__ == "__main__":
    job.exit_through_dispatcher("reshard")
