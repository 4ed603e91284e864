"""Which Beam worker process decoded each volume, and whether torch was imported there: counted by a test-only
subclass of the preprocessing job's DoFn, so the job itself carries no counter that only tests read.

    with counting_workers():
        report = preprocess.run(argv)
    report["counters"]["worker_pid_<pid>"]                         # volumes that worker process decoded
    report["counters"].get("volumes_on_workers_with_torch", 0)      # volumes decoded where torch was imported

The local runner's worker processes unpickle the subclass by reference to this module, which they import from the
repository root (their working directory, as the test run's).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any
from unittest import mock

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import preprocess


class CountingPreprocessFn(preprocess.PreprocessFn):
    """``PreprocessFn``, counting each decoded volume under its worker's pid (and when torch is loaded there)."""

    def process(self, row: Any) -> Iterator[Any]:
        for out in super().process(row):
            if not isinstance(out, beam.pvalue.TaggedOutput):
                Metrics.counter(preprocess.NAMESPACE, f"worker_pid_{os.getpid()}").inc()
                if "torch" in sys.modules:
                    Metrics.counter(preprocess.NAMESPACE, "volumes_on_workers_with_torch").inc()
            yield out


@contextlib.contextmanager
def counting_workers() -> Iterator[None]:
    """Preprocessing runs started inside decode with ``CountingPreprocessFn``."""
    with mock.patch.object(preprocess, "PreprocessFn", CountingPreprocessFn):
        yield
