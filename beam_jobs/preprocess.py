"""Beam job: AI-READI OCT DICOMs -> WebDataset shards, ``errors.jsonl`` and (last) ``index.json``.

    octjepa preprocess --manifest data/retinal_oct/manifest.tsv --data-root data --output shards/ \\
        [--config configs/<preset>.yaml] [--participants data/participants.tsv] \\
        [--devices zeiss_cirrus topcon_triton] [--anatomic-regions macula] [--samples-per-shard 32] \\
        [--overwrite] [--direct_num_workers 2]
    python -m beam_jobs.preprocess ...            # the same job
    octjepa preprocess --manifest gs://b/retinal_oct/manifest.tsv --data-root gs://b --output gs://b/shards \\
        --runner DataflowRunner --project P --region us-central1 --temp_location gs://b/tmp

``--data-root`` is the folder the manifest's ``filepath`` column is relative to (the dataset root, which holds
``retinal_oct/``). Any of the paths may be local or ``gs://``. Without ``--runner`` the job runs locally on Beam's
FnApiRunner with one worker process per core (see ``beam_jobs.runner``). The command line is parsed once, into
``beam_jobs.config.PreprocessOptions`` (validated; ``index.json`` records it as its ``config``).

Before anything under ``--output`` is touched, the driver reads the participants file and the manifest (which must
parse and select at least one row) and checks that the data root is a readable folder: a wrong path is a one-line
error within seconds. Then it takes the output's lease (``shards.lease``: a second job into the same output is
refused) and refuses an output that already holds a complete set (its ``index.json``) unless ``--overwrite``.

The pipeline::

    manifest url -ReadManifest-> rows (+ malformed and duplicate rows -> errors)
      -Reshuffle-> DecodeResample (read via fsspec, decode, resample, encode, stage; a row that fails -> errors)
      -GroupByFileUid-> OneSamplePerFile (first row of each in-file SOPInstanceUID; the others -> errors)
      -AssignShard-> (split, shard number) -GroupByKey-> WriteShards (sorted by key, streamed into one tar each)
    shard entries + errors + warnings + manifest stats -Finalise-> errors.jsonl, stale shards removed, index.json

One bad row never fails the job: whatever reading, decoding or resampling one file raises is routed to errors.jsonl
with its reason (``beam_jobs.dead_letters`` lists them and which storage errors count as transient). One file, one
sample: rows naming the same normalised path, or files holding the same SOPInstanceUID, keep the first row in
manifest order (``duplicate_file`` for the others); a file whose own SOPInstanceUID differs from its row's is a
``manifest_mismatch``; a PatientID that differs from the row's participant is a warning counted in the index.

Volumes do not travel through the shuffles: each encoded sample is staged as a one-sample tar under
``O/_staging/`` and only its key crosses the GroupByKeys, so a worker holds one volume at a time, whether it decodes
or writes a shard of a few hundred MB (Beam materialises a grouped value list in memory; a shard's worth of volumes
would be several times the largest volume). Staged samples are deterministic, so a retried bundle rewrites the same
bytes; Finalise deletes the staging folder.

Shards per split: ``n = ceil(selected rows in split / samples_per_shard)``, known from the manifest before any
decoding; a sample goes to shard ``stable_hash(key) % n``. Shard sizes therefore vary around samples_per_shard,
and a shard that receives no sample (all its rows rejected, or a very small split) is simply not written; the
index lists exactly the shards that exist.

Finalisation runs inside the pipeline, as one element whose side inputs are every shard entry and every error:
Beam only computes it once all shards are written, and on Dataflow the job completes its output even when the
launching machine detaches. Re-running it (a retried bundle, or a second run) rewrites the same bytes.
An earlier set's ``index.json`` is deleted just before the first new shard is written, so a run that dies midway
leaves a set that readers refuse, and a run in which every selected row fails writes no shard at all: it leaves an
earlier set as it was, puts its dead letters in ``O/failed-run-errors.jsonl`` and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import posixpath
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import dead_letters as dl
from beam_jobs import job, runner
from beam_jobs import manifest as mf
from beam_jobs.config import PreprocessConfig, PreprocessOptions, load_preprocess_config
from beam_jobs.dead_letters import Decoded, one_sample_per_file
from beam_jobs.preprocess_output import all_rows_failed, finalise, read_staged, retract_index, stage_sample, staged_url
from shards import device_counts, lease, stable_hash, storage, write_shard_file
from shards.typed_config import from_dict

_LOG = logging.getLogger(__name__)
NAMESPACE = "octjepa.preprocess"
ERRORS_TAG = "errors"
STATS_TAG = "stats"
WARNINGS_TAG = "warnings"


# ---------------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="octjepa preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--manifest", required=True, help="manifest.tsv (local path or gs://)")
    parser.add_argument("--data-root", required=True, help="folder the manifest's filepath column is relative to")
    parser.add_argument("--output", required=True, help="shard-set folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace the complete set that --output already holds")
    parser.add_argument("--config", default=None, help="preprocessing preset YAML (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set target_spacing_mm=[0.1,0.01,0.02]",
    )
    parser.add_argument("--participants", default=None, help="participants.tsv with recommended_split")
    parser.add_argument("--devices", nargs="+", default=[], choices=mf.DEVICES, help="keep only these devices")
    parser.add_argument("--anatomic-regions", nargs="+", default=[], help="keep only these regions (e.g. macula)")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help="samples per shard (default: about 256 MB of volumes per shard)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=mf.DEFAULT_VAL_FRACTION,
        help="share of participants hashed into val when --participants is not given",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> tuple[PreprocessOptions, list[str]]:
    """The job's options, validated, with the preset and its ``--set`` overrides loaded; and the rest of ``argv``
    (Beam's pipeline options)."""
    args, beam_args = build_parser().parse_known_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("config", "overrides")}
    config = load_preprocess_config(args.config, args.overrides)
    return from_dict(PreprocessOptions, {**fields, "preprocess": config}, where="octjepa preprocess"), beam_args


# ---------------------------------------------------------------------------------------------------- DoFns
class ReadManifestFn(beam.DoFn):
    """Manifest URL -> selected ``Row``s; malformed and duplicate rows to ERRORS_TAG; ``{manifest_rows, selected}``
    to STATS_TAG."""

    def __init__(self, selection: mf.Selection, recommended: Mapping[str, str] | None, val_fraction: float):
        self._selection, self._recommended, self._val_fraction = selection, recommended, val_fraction

    def process(self, url: str) -> Iterator[Any]:
        total, rows = mf.parse_manifest(
            url, selection=self._selection, recommended=self._recommended, val_fraction=self._val_fraction
        )
        Metrics.counter(NAMESPACE, "manifest_rows").inc(total)
        Metrics.counter(NAMESPACE, "selected").inc(len(rows))
        _LOG.info("manifest %s: %d rows, %d selected", url, total, len(rows))
        for row in rows:
            if isinstance(row, mf.BadRow):
                Metrics.counter(NAMESPACE, f"errors_{row.reason}").inc()
                yield beam.pvalue.TaggedOutput(ERRORS_TAG, mf.bad_row_record(row))
            else:
                yield row
        yield beam.pvalue.TaggedOutput(STATS_TAG, {"manifest_rows": total, "selected": len(rows)})


class PreprocessFn(beam.DoFn):
    """Row -> ``(the file's SOPInstanceUID, Decoded)`` after staging the encoded sample; a row whose file cannot be
    read or become a sample goes to ERRORS_TAG with its reason (``beam_jobs.dead_letters``), so that one file
    never stops the job. Writing the staged sample is the output's business: a failure there fails the bundle."""

    def __init__(self, data_root: str, output: str, config: PreprocessConfig, progress_every: int = 25):
        self._data_root, self._output, self._config = data_root, output, config
        self._progress_every = progress_every

    def setup(self) -> None:
        # Imported and created here, in the worker process: gcsfs must not be created before Beam forks/spawns.
        from beam_jobs.dicom import DicomReadError
        from beam_jobs.volume_to_sample import dicom_to_sample_and_header

        self._dicom_error, self._to_sample = DicomReadError, dicom_to_sample_and_header
        self._fs, self._base = storage.get_fs(self._data_root)
        self._done, self._started = 0, time.monotonic()
        self._decode_ms = Metrics.distribution(NAMESPACE, "decode_ms")

    def process(self, row: mf.Row) -> Iterator[Any]:
        url = storage.join(self._data_root, row.path)
        try:
            data = self._fs.cat_file(posixpath.join(self._base, row.path))
        # Whatever reading this one file raises is a property of this row, routed with its reason (see
        # dead_letters.read_failure_reason: gcsfs has already retried the transient ones).
        except Exception as exc:  # noqa: BLE001
            reason = dl.read_failure_reason(exc)
            detail = "file not found" if reason == "missing_file" else "cannot be read"
            yield self._error(row, "read", reason, f"{url}: {detail} ({dl.exception_message(exc)})")
            return
        start = time.monotonic()
        try:
            sample, header = self._to_sample(data, row=row.as_dict(), config=self._config, split=row.split)
        except self._dicom_error as exc:
            yield self._error(row, "decode", exc.reason, str(exc))
            return
        # Any other exception of the decoder, resampler or encoder (MemoryError and OSError included) is this
        # file's: routed and counted, never a reason to stop the job.
        except Exception as exc:  # noqa: BLE001
            yield self._error(row, "decode", "decode_error", f"{row.filepath}: {dl.exception_message(exc)}")
            return
        del data
        self._decode_ms.update(int((time.monotonic() - start) * 1000))
        if not header.sop_instance_uid:
            yield self._error(
                row,
                "decode",
                "manifest_mismatch",
                f"{row.filepath}: the file has no SOPInstanceUID; the row says {row.sop_instance_uid}",
            )
            return
        stage_sample(self._output, sample)
        Metrics.counter(NAMESPACE, "decoded").inc()
        self._progress()
        yield header.sop_instance_uid, Decoded(row, header.patient_id)

    def _error(self, row: mf.Row, stage: str, reason: str, message: str) -> Any:
        Metrics.counter(NAMESPACE, f"errors_{reason}").inc()
        Metrics.counter(NAMESPACE, "errors").inc()
        self._progress()
        return beam.pvalue.TaggedOutput(ERRORS_TAG, dl.error_record(row, stage=stage, reason=reason, message=message))

    def _progress(self) -> None:
        self._done += 1
        if self._done % self._progress_every == 0:
            rate = self._done / max(time.monotonic() - self._started, 1e-9)
            _LOG.info("worker %d: %d volumes done (%.2f volumes/s)", os.getpid(), self._done, rate)


class OneSamplePerFileFn(beam.DoFn):
    """(file SOPInstanceUID, [Decoded]) -> ``(row, key)`` of the row kept; the others' staged samples are deleted
    and their rows go to ERRORS_TAG; a PatientID that differs from the participant goes to WARNINGS_TAG."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element: tuple[str, Iterable[Decoded]]) -> Iterator[Any]:
        decoded = list(element[1])
        kept, errors, warnings = one_sample_per_file(element[0], decoded)
        for record in errors:
            storage.remove(staged_url(self._output, record["key"]))
            Metrics.counter(NAMESPACE, f"errors_{record['reason']}").inc()
            Metrics.counter(NAMESPACE, "errors").inc()
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, record)
        for record in warnings:
            _LOG.warning("row %d: %s", record["row"], record["message"])
            Metrics.counter(NAMESPACE, f"warnings_{record['kind']}").inc()
            yield beam.pvalue.TaggedOutput(WARNINGS_TAG, record)
        if kept is not None:
            row = kept.row
            Metrics.counter(NAMESPACE, "samples").inc()
            Metrics.counter(NAMESPACE, f"samples_{row.device}").inc()
            Metrics.counter(NAMESPACE, f"split_{row.split}").inc()
            yield row, row.key


def shard_number(key: str, n_shards: int) -> int:
    return stable_hash(key) % n_shards


def assign_shard(
    item: tuple[mf.Row, str], rows_per_split: Mapping[str, int], samples_per_shard: int
) -> tuple[tuple[str, int], tuple[str, str]]:
    """``(row, key)`` -> ``((split, shard number), (key, device))``."""
    row, key = item
    n_shards = math.ceil(rows_per_split[row.split] / samples_per_shard)
    return (row.split, shard_number(key, n_shards)), (key, row.device)


class WriteShardFn(beam.DoFn):
    """((split, number), [(key, device)]) -> the shard's index entry, plus its per-device counts (``by_device``).

    Deletes an earlier set's index.json before writing: from the first new shard on, readers see an incomplete set
    and refuse it, while a run that writes no shard (every row failed) leaves the earlier set whole."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element: tuple[tuple[str, int], Iterable[tuple[str, str]]]) -> Iterator[dict[str, Any]]:
        (split, number), members = element
        retract_index(self._output)
        # Sorted by key so the tar's bytes do not depend on the order the shuffle delivered the samples in.
        members = sorted(members)
        samples = (read_staged(self._output, key) for key, _ in members)
        entry = write_shard_file(self._output, split, number, samples)
        Metrics.counter(NAMESPACE, "shards_written").inc()
        Metrics.counter(NAMESPACE, "bytes_written").inc(entry["bytes"])
        _LOG.info("wrote %s (%d samples, %d bytes)", entry["path"], entry["num_samples"], entry["bytes"])
        yield {**entry, "by_device": device_counts(device for _, device in members)}


class FinaliseFn(beam.DoFn):
    """Output URL -> the index (nothing when every row failed), after checking that no input was lost."""

    def __init__(self, config: Mapping[str, Any]):
        self._config = dict(config)

    def process(
        self,
        output: str,
        entries: list[dict[str, Any]],
        errors: list[dict[str, Any]],
        warnings: list[dict[str, Any]],
        stats: Mapping[str, int],
    ) -> Iterator[dict[str, Any]]:
        index = finalise(
            output,
            entries=entries,
            errors=errors,
            warnings=warnings,
            manifest_rows=stats["manifest_rows"],
            selected=stats["selected"],
            config=self._config,
        )
        if index is not None:
            yield index


# ---------------------------------------------------------------------------------------------------- transforms
class Preprocess(beam.PTransform):
    """Selected rows -> ``(shard entries, error records, warning records)``."""

    def __init__(self, opts: PreprocessOptions):
        super().__init__()
        self._opts = opts

    def expand(self, rows: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
        opts = self._opts
        rows_per_split = (
            rows | "KeyBySplit" >> beam.Map(lambda row: (row.split, 1)) | "CountPerSplit" >> beam.CombinePerKey(sum)
        )
        decoded = (
            rows
            # Reading the manifest is one cheap step on one worker; redistribute before the costly decode.
            | "Reshuffle" >> beam.Reshuffle()
            | "DecodeResample"
            >> beam.ParDo(PreprocessFn(opts.data_root, opts.output, opts.preprocess)).with_outputs(
                ERRORS_TAG, main="decoded"
            )
        )
        kept = (
            decoded.decoded
            | "GroupByFileUid" >> beam.GroupByKey()
            | "OneSamplePerFile"
            >> beam.ParDo(OneSamplePerFileFn(opts.output)).with_outputs(ERRORS_TAG, WARNINGS_TAG, main="samples")
        )
        entries = (
            kept.samples
            | "AssignShard"
            >> beam.Map(
                assign_shard,
                rows_per_split=beam.pvalue.AsDict(rows_per_split),
                samples_per_shard=opts.samples_per_shard,
            )
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShardFn(opts.output))
        )
        errors = (decoded[ERRORS_TAG], kept[ERRORS_TAG]) | "RowErrors" >> beam.Flatten()
        return entries, errors, kept[WARNINGS_TAG]


# ---------------------------------------------------------------------------------------------------- run
def build_pipeline(pipeline: beam.Pipeline, opts: PreprocessOptions, *, recommended: Mapping[str, str] | None) -> None:
    """Add the job's steps to ``pipeline`` (nothing runs until ``pipeline.run()``)."""
    read = (
        pipeline
        | "ManifestUrl" >> beam.Create([opts.manifest])
        | "ReadManifest"
        >> beam.ParDo(ReadManifestFn(opts.selection, recommended, opts.val_fraction)).with_outputs(
            ERRORS_TAG, STATS_TAG, main="rows"
        )
    )
    entries, row_errors, warnings = read.rows | "Preprocess" >> Preprocess(opts)
    errors = (read[ERRORS_TAG], row_errors) | "AllErrors" >> beam.Flatten()
    _ = (
        pipeline
        | "OutputUrl" >> beam.Create([opts.output])
        | "Finalise"
        >> beam.ParDo(
            FinaliseFn(opts.recorded()),
            entries=beam.pvalue.AsList(entries),
            errors=beam.pvalue.AsList(errors),
            warnings=beam.pvalue.AsList(warnings),
            stats=beam.pvalue.AsSingleton(read[STATS_TAG]),
        )
    )


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the job to completion; returns ``{"index", "counters", "seconds"}``."""
    opts, beam_args = parse_options(argv)
    options = runner.pipeline_options(beam_args, job_name="octjepa-preprocess")
    runner.check_dataflow(options, manifest=opts.manifest, data_root=opts.data_root, output=opts.output)
    recommended = mf.check_inputs(
        opts.manifest,
        participants=opts.participants,
        data_root=opts.data_root,
        selection=opts.selection,
        val_fraction=opts.val_fraction,
    )

    with lease.hold(opts.output, job="preprocess") as held:
        lease.require_overwrite(opts.output, opts.overwrite)
        counters, seconds = job.run_pipeline(
            options,
            lambda pipeline: build_pipeline(pipeline, opts, recommended=recommended),
            on_signal=held.release,
            namespace=NAMESPACE,
        )
        index = job.read_result(opts.output, lambda errors: all_rows_failed(opts.output, errors))
    return {"index": index, "counters": counters, "seconds": seconds}


def summary(report: Mapping[str, Any]) -> str:
    index, seconds = report["index"], report["seconds"]
    shards = [s for split in index["splits"].values() for s in split["shards"]]
    return "\n".join(
        [
            f"preprocess: {index['selected']} selected of {index['manifest_rows']} manifest rows -> "
            f"{sum(index['counts']['by_split'].values())} samples in {len(shards)} shards, "
            f"{index['errors']['count']} errors, {index['warnings']['count']} warnings",
            f"  by split:  {index['counts']['by_split']}",
            f"  by device: {index['counts']['by_device']}",
            f"  errors:    {index['errors']['by_reason']}",
            f"  warnings:  {index['warnings']['by_kind']}",
            f"  {index['selected'] / max(seconds, 1e-9):.2f} volumes/s over {seconds:.1f} s; "
            f"{sum(s['bytes'] for s in shards) / 1e6:.1f} MB of shards written",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    return job.main(run, summary, argv)


if __name__ == "__main__":
    job.exit_through_dispatcher("preprocess")
