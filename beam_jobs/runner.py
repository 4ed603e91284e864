"""Pipeline options and runner choice shared by the Beam jobs (``preprocess``, ``reshard``).

Local runs (no ``--runner``, or ``DirectRunner`` / ``FnApiRunner``) execute on Beam's FnApiRunner in multi-processing
mode, one SDK worker process per core. The DirectRunner is not used directly because it first tries the Prism
runner, which it downloads from the network. Dataflow runs get a job name unique to the run (two jobs can run at
once) and, unless the workers run this project's image (``--sdk_container_image``, built from
``dataflow/Dockerfile``), ``--setup_file`` pointing at this project's ``setup.py``, so every worker installs the
package, without torch::

    python -m beam_jobs.preprocess ... --direct_num_workers 2                       # local, 2 worker processes
    python -m beam_jobs.preprocess ... --runner DataflowRunner --project P --region R --temp_location gs://b/tmp
    python -m beam_jobs.preprocess ... --runner DataflowRunner ... --sdk_container_image R-docker.pkg.dev/P/r/img:t

A job uses this module as::

    args, beam_args = parser.parse_known_args(argv)
    options = runner.pipeline_options(beam_args, job_name="octjepa-preprocess")
    runner.check_dataflow(options, manifest=args.manifest, output=args.output)   # before anything is built
    with runner.make_pipeline(options) as p: ...   # or p = make_pipeline(options); result = run_and_wait(p)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shlex
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from shards import storage
from shards.typed_config import ConfigError

_LOG = logging.getLogger(__name__)

LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "SwitchingDirectRunner")
# The project's setup.py (repository root, one level above this package). Only the launching machine needs it.
PROJECT_SETUP_FILE = Path(__file__).resolve().parents[1] / "setup.py"


class RunnerConfigError(ConfigError):
    """Pipeline options that cannot run as given; the message names the option."""


def runner_name(options: PipelineOptions) -> str:
    """The runner's short name ('' means the default, local)."""
    name = options.view_as(StandardOptions).runner or ""
    return name.rsplit(".", 1)[-1] if isinstance(name, str) else type(name).__name__


def is_local(options: PipelineOptions) -> bool:
    return runner_name(options) in ("",) + LOCAL_RUNNERS


def pipeline_options(
    beam_args: Sequence[str], *, job_name: str | None = None, setup_file: str | os.PathLike[str] | None = None
) -> PipelineOptions:
    """Standard Beam options from ``beam_args`` plus this project's defaults.

    Local: ``direct_running_mode=multi_processing`` and one worker per core unless the user set them.
    Dataflow: a job name unique to this run (``job_name`` plus a timestamp, unless the user set ``--job_name``),
    ``setup_file`` (this project's ``setup.py`` unless the user named one, or none when the workers run a custom
    container, which has the package installed) and ``save_main_session``.
    Nothing is submitted here; tests inspect the result.
    """
    options = PipelineOptions(list(beam_args))
    if is_local(options):
        direct = options.view_as(DirectOptions)
        given = _named_in(beam_args)
        if "direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing"
        if "direct_num_workers" not in given:
            direct.direct_num_workers = os.cpu_count() or 1
        return options

    setup = options.view_as(SetupOptions)
    # A custom container already holds the package: staging its sdist as well would make every worker pip-install
    # it at start-up, which needs a package index (for the build backend) that private workers may not reach.
    if not setup.setup_file and not options.view_as(WorkerOptions).sdk_container_image:
        path = Path(setup_file) if setup_file is not None else PROJECT_SETUP_FILE
        if not path.is_file():
            raise RunnerConfigError(
                f"--runner {runner_name(options)}: workers need the package, but {path} does not exist; "
                f"run from a source checkout or pass --setup_file /path/to/setup.py"
            )
        setup.setup_file = str(path)
    # The jobs' DoFns live in importable modules (on workers from setup_file or the image); save_main_session also
    # ships anything a user defined in __main__ when calling run() from their own script.
    if setup.save_main_session is None:
        setup.save_main_session = True
    gcloud = options.view_as(GoogleCloudOptions)
    if job_name and not gcloud.job_name:
        gcloud.job_name = unique_job_name(job_name)
    return options


def unique_job_name(prefix: str, now: datetime | None = None) -> str:
    """``prefix-YYYYMMDD-HHMMSS-xxxxxx`` (UTC, 6 random hex digits): Dataflow refuses a second running job of the
    same name in a project and region, so each run gets its own. Lowercase letters, digits and hyphens, as Dataflow
    requires."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{uuid.uuid4().hex[:6]}"


def check_dataflow(options: PipelineOptions, **paths: str | None) -> None:
    """Fail fast, before a DataflowRunner job is built: missing ``--project`` / ``--region`` / ``--temp_location``,
    a location the workers cannot reach (a local path) or a bucket that cannot be read are one-line errors
    (``RunnerConfigError``) naming the option. ``paths`` are the job's own locations that workers read or write,
    by option name (``data_root="gs://b"`` is ``--data-root``). Other runners: nothing to check."""
    if runner_name(options) != "DataflowRunner":
        return
    gcloud = options.view_as(GoogleCloudOptions)
    for flag, value, example in (
        ("--project", gcloud.project, "P"),
        ("--region", gcloud.region, "us-central1"),
        ("--temp_location", gcloud.temp_location, "gs://BUCKET/tmp"),
    ):
        if not value:
            raise RunnerConfigError(f"--runner DataflowRunner needs {flag} (e.g. {flag} {example})")
    locations = {f"--{name.replace('_', '-')}": url for name, url in paths.items() if url}
    locations["--temp_location"] = gcloud.temp_location
    if gcloud.staging_location:
        locations["--staging_location"] = gcloud.staging_location
    buckets: dict[str, str] = {}  # bucket URL -> the first option that names it
    for flag, url in locations.items():
        if not url.startswith("gs://"):
            raise RunnerConfigError(
                f"{flag} {url}: Dataflow workers cannot reach this machine's files; give a gs:// URL"
            )
        buckets.setdefault("gs://" + url[len("gs://") :].split("/", 1)[0], flag)
    for bucket, flag in buckets.items():
        try:
            storage.check_readable(bucket)
        except PermissionError as exc:
            raise RunnerConfigError(f"{flag}: {exc}") from exc


def _named_in(beam_args: Sequence[str]) -> set[str]:
    """Option names the user wrote (a value equal to Beam's default still counts as a choice)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in beam_args if a.startswith("--")}


def make_runner(options: PipelineOptions) -> Any:
    """A runner instance for local runs (FnApiRunner carrying the pipeline options to its workers); None otherwise,
    so that ``beam.Pipeline`` resolves ``--runner`` by name.

    In multi-processing mode the workers are Beam's own, started through ``beam_jobs.local_worker`` so that they
    die with the driver (see there); FnApiRunner takes the command as its ``default_environment``.
    """
    if not is_local(options):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    from apache_beam.transforms import environments

    # As Beam's own SwitchingDirectRunner does: workers read the pipeline options from the provision info.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    environment = None
    if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        environment = environments.SubprocessSDKEnvironment.from_command_string(worker_command())
    return fn_runner.FnApiRunner(default_environment=environment, provision_info=info)


def worker_command() -> str:
    """The shell command (Beam runs it with ``shell=True``) of one local SDK worker. ``exec`` makes the worker the
    driver's own child, which ``beam_jobs.local_worker`` binds its life to."""
    return f"exec {shlex.quote(sys.executable)} -m beam_jobs.local_worker {os.getpid()}"


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    runner = make_runner(options)
    if runner is None:
        return beam.Pipeline(options=options)
    if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        # FnApiRunner replaces its default environment by Beam's worker command when it sees this mode; the
        # runner already has the same workers started through beam_jobs.local_worker.
        options = copy.deepcopy(options)
        options.view_as(DirectOptions).direct_running_mode = None
    return beam.Pipeline(runner=runner, options=options)


def run_and_wait(pipeline: beam.Pipeline, *, on_signal: Callable[[], None] | None = None) -> Any:
    """Run the pipeline to completion; raise if it did not finish in state DONE.

    On a local runner, SIGINT and SIGTERM during the run call ``on_signal`` (e.g. to release the output's lease)
    and then end the driver at once, as the signal's default action would: its workers die with it
    (``beam_jobs.local_worker``). Python's own SIGINT handling would instead unwind through the runner, which waits
    for every worker to finish its bundle first.
    """
    with _ending_on_signal(pipeline, on_signal):
        result = pipeline.run()
        state = result.wait_until_finish()
    if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        raise RuntimeError(f"pipeline finished in state {state}")
    return result


@contextlib.contextmanager
def _ending_on_signal(pipeline: beam.Pipeline, on_signal: Callable[[], None] | None) -> Iterator[None]:
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    if not isinstance(pipeline.runner, fn_runner.FnApiRunner) or not in_main_thread:
        yield
        return

    def end(signum: int, _frame: Any) -> None:
        _LOG.error("received %s: ending the job and its local workers", signal.Signals(signum).name)
        try:
            if on_signal is not None:
                on_signal()
        finally:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    previous = {signum: signal.signal(signum, end) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def counters(result: Any, namespace: str | None = None) -> dict[str, int]:
    """Committed counter values of a finished pipeline, ``{name: value}`` (summed over steps)."""
    out: dict[str, int] = {}
    for counter in result.metrics().query()["counters"]:
        name = counter.key.metric
        if namespace is not None and name.namespace != namespace:
            continue
        value = counter.committed if counter.committed is not None else counter.attempted
        out[name.name] = out.get(name.name, 0) + int(value or 0)
    return out
