"""Preprocessing job scaling on realistic-size JPEG 2000 volumes: 1 vs 2 local workers, and the job's overhead.

    python benchmarks/beam_scaling.py --work /tmp/beam_scaling --volumes 8 --scale 1.0

Generates (once, reused from --work) a synthetic AI-READI dataset whose volumes are all JPEG 2000 at the devices'
real grid sizes (--scale 1.0), keeps the first --volumes manifest rows, then measures in one run:

1. the pure per-volume work, in this process, one volume after another: ``read_oct_dicom`` (decode) and
   ``dicom_to_sample`` (decode + resample + encode, everything the job does per volume);
2. the whole job (``beam_jobs.preprocess.run``: worker start-up, manifest, shuffle, decode, shard tar writing,
   index) with ``--direct_num_workers 1`` and then ``2``, each into a fresh output;
3. the peak resident memory of every Beam worker process (sampled every 50 ms), against the largest decoded volume
   and against the resident size of an idle process that has imported the same modules.

Printed ratios and their targets: throughput 2 workers / 1 worker (>= 1.6); job time on 1 worker / sum of per-volume
times (<= 1.25); (peak worker RSS - idle RSS) / largest decoded volume (<= 3). The machine's load average is printed
too: on a shared machine wall times include other processes' work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import psutil
from apache_beam.metrics import Metrics

from beam_jobs import preprocess

IDLE_IMPORTS = (
    "import apache_beam.runners.worker.sdk_worker_main, beam_jobs.preprocess, beam_jobs.volume_to_sample, "
    "pydicom, openjpeg, scipy.sparse, psutil, os; print(psutil.Process(os.getpid()).memory_info().rss)"
)


def build_dataset(work: Path, volumes: int, scale: float, seed: int) -> dict[str, Any]:
    """A dataset with at least ``volumes`` raster JPEG 2000 scans; its manifest trimmed to the first ``volumes``."""
    from synth.dataset import generate_dataset

    root = work / f"aireadi-scale{scale}-seed{seed}"
    summary_path = root / "summary.json"
    if not summary_path.exists():
        participants = max(1, -(-volumes // 2))
        while True:
            summary = generate_dataset(
                str(root),
                participants=participants,
                scale=scale,
                seed=seed,
                uncompressed_fraction=0.0,
                onh_radial=False,
                progress=lambda p: print(f"  generated {p}", flush=True),
            )
            if summary["volumes"] >= volumes:
                break
            participants += 1
        summary_path.write_text(json.dumps(summary))
    summary = json.loads(summary_path.read_text())
    lines = Path(summary["manifest"]).read_text().splitlines()
    trimmed = root / f"manifest-{volumes}.tsv"
    trimmed.write_text("\n".join(lines[: volumes + 1]) + "\n")
    return {**summary, "manifest": str(trimmed), "volumes": volumes}


def pure_times(dataset: dict[str, Any], config: Any) -> dict[str, Any]:
    from beam_jobs import manifest as mf
    from beam_jobs.dicom import read_oct_dicom
    from beam_jobs.volume_to_sample import dicom_to_sample

    _, rows = mf.parse_manifest(dataset["manifest"])
    decode, full, largest = [], [], 0
    for row in rows:
        data = Path(dataset["root"], row.filepath.lstrip("/")).read_bytes()
        start = time.perf_counter()
        volume, _ = read_oct_dicom(data, name=row.filepath, max_decoded_bytes=config.max_decoded_bytes)
        decode.append(time.perf_counter() - start)
        largest = max(largest, volume.nbytes)
        del volume
        start = time.perf_counter()
        dicom_to_sample(data, row=row.as_dict(), config=config, split=row.split)
        full.append(time.perf_counter() - start)
    return {"decode_s": sum(decode), "per_volume_s": sum(full), "largest_decoded_bytes": largest, "volumes": len(rows)}


class WorkerMemory:
    """Peak RSS of every descendant process (the Beam SDK workers), sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.peaks: dict[int, int] = {}
        self._interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), rss)
            time.sleep(self._interval)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class WorkerCountingFn(preprocess.PreprocessFn):
    """The job's decode step, also counting the volumes each worker process decoded (``worker_pid_<pid>``): shows
    that every worker took work. Defined in this script, so Beam ships it to the workers by value."""

    def process(self, row: Any) -> Iterator[Any]:
        for out in super().process(row):
            if not isinstance(out, beam.pvalue.TaggedOutput):
                Metrics.counter(preprocess.NAMESPACE, f"worker_pid_{os.getpid()}").inc()
            yield out


def run_job(dataset: dict[str, Any], output: Path, workers: int) -> dict[str, Any]:
    argv = [
        "--manifest",
        dataset["manifest"],
        "--data-root",
        dataset["root"],
        "--output",
        str(output),
        "--direct_num_workers",
        str(workers),
    ]
    preprocess.PreprocessFn = WorkerCountingFn  # this script's own runs only
    with WorkerMemory() as memory:
        start = time.perf_counter()
        report = preprocess.run(argv)
        seconds = time.perf_counter() - start
    samples = sum(report["index"]["counts"]["by_split"].values())
    if samples != dataset["volumes"]:
        raise RuntimeError(
            f"{workers} worker(s): {samples} samples for {dataset['volumes']} volumes; "
            f"errors {report['index']['errors']}"
        )
    active = {k: v for k, v in report["counters"].items() if k.startswith("worker_pid_")}
    return {
        "seconds": seconds,
        "volumes_per_s": samples / seconds,
        "peak_rss": max(memory.peaks.values()),
        "workers_with_work": len(active),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/beam_scaling", help="folder for the dataset and outputs")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = the devices' real grid sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from beam_jobs.config import load_preprocess_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"dataset: {args.volumes} JPEG 2000 volumes at scale {args.scale} in {work}", flush=True)
    dataset = build_dataset(work, args.volumes, args.scale, args.seed)
    config = load_preprocess_config(None)

    pure = pure_times(dataset, config)
    print(
        f"pure, sequential in-process: decode {pure['decode_s']:.1f} s, decode+resample+encode "
        f"{pure['per_volume_s']:.1f} s; largest decoded volume {pure['largest_decoded_bytes'] / 2**20:.0f} MiB",
        flush=True,
    )
    stamp = time.strftime("%H%M%S")
    one = run_job(dataset, work / f"out-1w-{stamp}", 1)
    print(f"job, 1 worker:  {one['seconds']:.1f} s, {one['volumes_per_s']:.3f} volumes/s", flush=True)
    two = run_job(dataset, work / f"out-2w-{stamp}", 2)
    print(
        f"job, 2 workers: {two['seconds']:.1f} s, {two['volumes_per_s']:.3f} volumes/s "
        f"({two['workers_with_work']} workers did work)",
        flush=True,
    )
    idle = int(
        subprocess.run([sys.executable, "-c", IDLE_IMPORTS], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    peak = max(one["peak_rss"], two["peak_rss"])
    largest = pure["largest_decoded_bytes"]
    same = all(
        (work / f"out-1w-{stamp}" / p).read_bytes() == (work / f"out-2w-{stamp}" / p).read_bytes()
        for p in ("index.json", "errors.jsonl")
    )

    print("\n== figures ==")
    print(f"load average during run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"throughput 2 workers / 1 worker:            {two['volumes_per_s'] / one['volumes_per_s']:.2f}x "
        f"(target >= 1.6)"
    )
    print(
        f"job time 1 worker / sum of per-volume time: {one['seconds'] / pure['per_volume_s']:.2f}x (target <= 1.25)"
        f"  [vs decode alone: {one['seconds'] / pure['decode_s']:.2f}x]"
    )
    print(
        f"peak worker RSS {peak / 2**20:.0f} MiB; idle worker-like process {idle / 2**20:.0f} MiB; "
        f"largest decoded volume {largest / 2**20:.0f} MiB"
    )
    print(
        f"(peak - idle) / largest decoded volume:     {(peak - idle) / largest:.2f}x (target <= 3); "
        f"peak / largest: {peak / largest:.2f}x"
    )
    print(f"1-worker and 2-worker indexes identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
