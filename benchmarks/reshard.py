"""Re-sharding throughput as a ratio to a plain copy of the same bytes, measured in one run on local disk.

    python benchmarks/reshard.py                          # 32 samples of 64x384x384 uint8 (~300 MB), 4 devices
    python benchmarks/reshard.py --samples 64 --repeats 3 --workdir /mnt/disk/bench

Printed, all from this run (page cache warm for every reader, as the source was just written):
  copy (fsync)     s to copy every file of the source set with storage.write_bytes(read_bytes(...)): the same
                   atomic, fsync'ed write the shard writer uses
  copy (kernel)    s for shutil.copyfile of the same files (no fsync; a lower bound, for reference)
  reshard          s for beam_jobs.reshard.run by device (scan of every source shard's headers, its sha256 check,
                   ranged reads of the volume bytes, tar + sha256 + fsync'ed write of every output shard, indexes),
                   in this process after imports, for each local running mode given with --modes
  reshard CLI      s for `python -m beam_jobs.reshard` in a fresh process with the default local runner
                   (multi-threading, one worker per core): includes interpreter, imports and Beam start-up
  ratio            copy (fsync) time / reshard time = reshard throughput as a fraction of copy    (target >= 0.5)
  marginal ratio   the same with each reshard time less the time of the same run on a tiny set of the same
                   layout (4-sample-per-device, 4x8x8 volumes): Beam's fixed start-up cost taken out, i.e. the
                   throughput a larger set approaches
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# Run as a script, this file's folder leads sys.path: put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

from shards import storage  # noqa: E402
from shards.synthetic import make_shard_set  # noqa: E402


def copy_set(src: str, dst: str, *, fsync: bool) -> None:
    for folder, _, files in os.walk(src):
        for name in files:
            source = os.path.join(folder, name)
            target = os.path.join(dst, os.path.relpath(source, src))
            if fsync:
                storage.write_bytes(target, storage.read_bytes(source))
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(source, target)


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="volumes in the source set (spread over 4 devices)")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 384, 384], metavar=("D", "H", "W"))
    parser.add_argument("--source-samples-per-shard", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=None, help="passed to reshard (default: its own)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["in_memory", "multi_threading"],
        help="in-process local running modes to time (in_memory, multi_threading, multi_processing)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="folder on the disk to measure (default: a temp folder)")
    args = parser.parse_args(argv)

    import webdataset  # noqa: F401 -- its one-time import (it pulls in torch when installed) is not copy work

    from beam_jobs import reshard

    work = tempfile.mkdtemp(prefix="reshard-bench-", dir=args.workdir)
    try:
        source = os.path.join(work, "source")
        per_device = max(1, args.samples // 4)
        started = time.perf_counter()
        make_shard_set(
            source, per_device=per_device, shape=tuple(args.shape), samples_per_shard=args.source_samples_per_shard
        )
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(source) for f in fs)
        print(
            f"source: {4 * per_device} samples of {'x'.join(map(str, args.shape))} uint8, {total / 1e6:.1f} MB "
            f"(built in {time.perf_counter() - started:.1f} s)"
        )

        tiny = os.path.join(work, "tiny")
        make_shard_set(tiny, per_device=per_device, shape=(4, 8, 8), samples_per_shard=args.source_samples_per_shard)

        extra = ["--samples-per-shard", str(args.samples_per_shard)] if args.samples_per_shard else []
        times: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            runs = [
                ("copy (fsync)", source, lambda src, out: copy_set(src, out, fsync=True)),
                ("copy (kernel)", source, lambda src, out: copy_set(src, out, fsync=False)),
            ]
            for mode in args.modes:
                workers = "1" if mode == "in_memory" else str(os.cpu_count() or 1)
                for name, src in ((f"reshard {mode}", source), (f"  same, tiny set {mode}", tiny)):
                    runs.append(
                        (
                            name,
                            src,
                            lambda src, out, m=mode, w=workers: reshard.run(
                                [
                                    "--input",
                                    src,
                                    "--output",
                                    out,
                                    *extra,
                                    f"--direct_running_mode={m}",
                                    f"--direct_num_workers={w}",
                                ]
                            ),
                        )
                    )
            runs.append(
                (
                    "reshard CLI",
                    source,
                    lambda src, out: subprocess.run(
                        [sys.executable, "-m", "beam_jobs.reshard", "--input", src, "--output", out, *extra],
                        check=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
            for name, src, fn in runs:
                out = os.path.join(work, f"out-{repeat}")
                times.setdefault(name, []).append(timed(fn, src, out))
                shutil.rmtree(out)

        median = {name: statistics.median(values) for name, values in times.items()}
        copy = median["copy (fsync)"]
        print(f"{'step':<30}{'median s':>9}{'MB/s':>7}{'ratio':>7}{'marginal':>10}   runs")
        for name, values in times.items():
            fixed = median.get(name.replace("reshard ", "  same, tiny set "), 0.0) if "tiny" not in name else 0.0
            marginal = f"{copy / (median[name] - fixed):.2f}" if fixed and median[name] > fixed else ""
            rates = ("", "") if "tiny" in name else (f"{total / 1e6 / median[name]:.0f}", f"{copy / median[name]:.2f}")
            print(
                f"{name:<30}{median[name]:>9.2f}{rates[0]:>7}{rates[1]:>7}{marginal:>10}   "
                + " ".join(f"{v:.2f}" for v in values)
            )
        print("ratio = copy (fsync) time / this time; target: reshard >= 0.5 of copy speed on local disk")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
