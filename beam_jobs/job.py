"""What the two Beam jobs (``preprocess``, ``reshard``) share around their pipelines: running one and timing it, the
record of a run that could not write a set, and the command line's ``main``.

    with lease.hold(output, job="reshard") as held:
        counters, seconds = job.run_pipeline(options, build, on_signal=held.release, namespace=NAMESPACE)
        index = job.read_result(output, failure)    # the index it wrote, or failure(records) raised
    return job.main(run, summary, argv)             # the job's main(argv)
    job.exit_through_dispatcher("reshard")          # python -m beam_jobs.reshard

Each job's Finalise step, inside the pipeline, writes the output's index.json or, when the run cannot give a complete
set (every selected row failed; a source shard is corrupt), its records to ``O/FAILED_RUN_ERRORS`` instead. The
driver reads that file after the pipeline and raises the job's error from it: a problem a worker finds is data, never
an exception, whose type Beam's runners reduce to traceback text. A later run that writes a set removes the file.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import apache_beam as beam

from beam_jobs import runner
from shards import load_any_index, storage
from shards.errors import OctjepaError

FAILED_RUN_ERRORS = "failed-run-errors.jsonl"


def run_pipeline(
    options: Any, build: Callable[[beam.Pipeline], None], *, on_signal: Callable[[], None], namespace: str
) -> tuple[dict[str, int], float]:
    """Build the job's steps (``build(pipeline)``) on the runner ``options`` name and run them to completion;
    returns (the committed counters of ``namespace``, seconds). ``on_signal``: see ``runner.run_and_wait``."""
    started = time.monotonic()
    pipeline = runner.make_pipeline(options)
    build(pipeline)
    result = runner.run_and_wait(pipeline, on_signal=on_signal)
    return runner.counters(result, namespace), time.monotonic() - started


def encode_jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    """One JSON object a line, keys sorted: the same records give the same bytes."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")


def write_failed_run(output: str, records: Sequence[Mapping[str, Any]]) -> None:
    storage.write_bytes(storage.join(output, FAILED_RUN_ERRORS), encode_jsonl(records))


def clear_failed_run(output: str) -> None:
    storage.remove(storage.join(output, FAILED_RUN_ERRORS))


def read_failed_run(output: str) -> list[dict[str, Any]] | None:
    """The records of this output's failed run; None when the last run wrote a set."""
    url = storage.join(output, FAILED_RUN_ERRORS)
    fs, path = storage.get_fs(url)
    fs.invalidate_cache()  # written by a worker: a listing cached here before the run would miss it
    if not fs.exists(path):
        return None
    return [json.loads(line) for line in storage.read_bytes(url).decode("utf-8").splitlines()]


def read_result(output: str, failure: Callable[[list[dict[str, Any]]], OctjepaError]) -> dict[str, Any]:
    """The index.json this run wrote; ``failure(records)`` raised when it wrote the failed-run file instead."""
    records = read_failed_run(output)
    if records is not None:
        raise failure(records)
    return load_any_index(output)


def main(
    run: Callable[[Sequence[str] | None], Mapping[str, Any]],
    summary: Callable[[Mapping[str, Any]], str],
    argv: Sequence[str] | None,
) -> int:
    """A job's command line: run it and print its summary. User errors (OctjepaError) propagate to the ``octjepa``
    dispatcher, which prints them as one line with their exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Beam logs every bundle at INFO; keep the job's own progress lines readable.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    print(summary(run(argv)), flush=True)
    return 0


def exit_through_dispatcher(command: str) -> NoReturn:
    """``python -m beam_jobs.<job>``: run as ``octjepa <command>``, for its one-line errors. The dispatcher imports
    the job's module by its name, so its DoFns pickle by reference to that module (importable on the workers), not
    as classes of ``__main__``."""
    import octjepa_cli

    sys.exit(octjepa_cli.main([command, *sys.argv[1:]]))
