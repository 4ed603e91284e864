"""Loader throughput on realistic shards (64x384x384 uint8), as ratios measured in one run.

    python benchmarks/loader.py --workdir /tmp/loader-bench              # one core: the loader in this process
    python benchmarks/loader.py --workdir /tmp/loader-bench --workers 1  # one loader worker process
    python benchmarks/loader.py --workdir /tmp/loader-bench --skip-dicom # loader vs raw read only

Printed, all from this run (CPU time per sample is the per-core cost; wall time is shown too, but on a shared
machine it also counts waiting for a core):
  raw read     the shard tars' bytes read with plain 4 MiB reads (page cache warm, as for the loader)
  loader       trainer.data.build_train_loader end to end: tar headers, each shard's size against its index,
               CRC32C and contract check of metadata and .npy header, crop/flip/jitter draws, voxels read from
               the shard straight into a random slot of the open batches (the shuffle buffer) and their CRC32C
               checked there, static batches with masks; batches stay uint8 (normalised and flipped on the
               device). --workers N adds the worker processes and shared-memory batches.
  cost ratio   loader / raw read, per sample                                                   (target <= 3)
  per-sample   the path the shards replace, every time a sample is used: decode one realistic JPEG 2000
               DICOM (synth's Maestro2, 128x885x512) with beam_jobs.dicom.read_oct_dicom and
               resample it with beam_jobs.resample.resample_to_grid
  speed-up     per-sample path / loader, per sample                                          (target >= 100)
  peak memory  PSS growth of this process and its loader workers during one epoch, next to the shuffle buffer

A --workdir keeps the shard set and the DICOM (encoding takes about a minute) for the next run. The benchmark
may import beam_jobs; the trainer package may not.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

# Run as a script, this file's folder leads sys.path: put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import shards  # noqa: E402
from model.config import EncoderConfig, MaskConfig  # noqa: E402
from model.masks import MultiBlockMasks  # noqa: E402
from trainer.data import DataConfig, build_train_loader  # noqa: E402

DEVICE = "topcon_maestro2"
SPACING_MM = (0.047, 0.0039, 0.0117)  # roughly a Maestro2 macula cube resampled to 64 x 384 x 384


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 384, 384), help="stored = training (D, H, W)")
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--relist", type=int, default=8, help="times the index lists each shard file (epoch length)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shuffle-buffer", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="0: everything in this process, i.e. one core")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (interleaved with raw reads); best is kept")
    p.add_argument("--dicom-repeats", type=int, default=2)
    p.add_argument("--skip-dicom", action="store_true")
    p.add_argument("--workdir", default=None, help="where to write the shard set (default: a temporary folder)")
    return p.parse_args(argv)


def realistic_volume(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """An OCT-like uint8 Maestro2 volume from synth's image model (content does not change the loader's cost,
    volumes are stored uncompressed; it does change JPEG 2000's)."""
    from synth.devices import DEVICES
    from synth.volumes import oct_volume

    return oct_volume(shape, spacing_mm, style=DEVICES[DEVICE].style, study_group="healthy", rng=rng)


def bench_config(args: argparse.Namespace) -> dict:
    """Recorded in the set's index, so a --workdir set is reused only when it was made with the same options."""
    return {
        "benchmark": "loader",
        "samples": args.samples,
        "shape": list(args.shape),
        "samples_per_shard": args.samples_per_shard,
        "relist": args.relist,
    }


def reusable_set(root: str, config: dict) -> dict | None:
    """The index of a --workdir set made with the same options in this shard format, else None (rewrite it)."""
    if not os.path.exists(os.path.join(root, shards.INDEX_NAME)):
        return None
    try:
        index = shards.read_index(root)
    except shards.ContractError:  # an older shard format (a set written before checksums, say)
        return None
    return index if index["config"] == config else None


def write_shard_set(root: str, n: int, shape: tuple[int, int, int], per_shard: int, config: dict, relist: int) -> dict:
    """n training samples (a few distinct volumes, reused: the loader's cost does not depend on pixel values).

    The index lists every shard file ``relist`` times: an epoch of ``relist * n`` samples without more disk, so
    the per-epoch start-up (worker fork, shuffle-buffer fill and read-ahead) is amortised as in a real epoch of
    thousands of samples, not charged to a few dozen.
    """
    rng = np.random.default_rng(0)
    distinct = [realistic_volume(shape, SPACING_MM, rng) for _ in range(min(n, 4))]
    entries, number = [], 0
    for shard_no in range((n + per_shard - 1) // per_shard):
        encoded = []
        for _ in range(min(per_shard, n - number)):
            volume = distinct[number % len(distinct)]
            uid = f"1.2.826.0.9.{number}"
            meta = {
                "format_version": shards.FORMAT_VERSION,
                "key": shards.make_key(DEVICE, f"{number}", uid),
                "participant_id": f"{number}",
                "device": DEVICE,
                "laterality": "R",
                "anatomic_region": "macula",
                "sop_instance_uid": uid,
                "source_path": f"bench/{number}.dcm",
                "source_shape": list(shape),
                "source_spacing_mm": list(SPACING_MM),
                "target_spacing_mm": list(SPACING_MM),
                "shape": list(shape),
                "dtype": "uint8",
                "fill_fraction": 1.0,
                "crop_offsets": [0, 0, 0],
                "intensity_mean": float(volume.mean()),
                "intensity_std": float(volume.std()),
                "split": "train",
            }
            encoded.append(shards.encode_sample(volume, meta))
            number += 1
        entries.append(shards.write_shard_file(root, "train", shard_no, encoded))
    index = shards.build_index(
        config=config,
        shards=entries * relist,
        by_split_device={"train": {DEVICE: n * relist}},
        errors_by_reason={},
        manifest_rows=n * relist,
        selected=n * relist,
        created_by="benchmarks/loader.py",
    )
    shards.write_index(root, index)
    return index


@dataclass
class Cost:
    """Wall seconds and CPU seconds (this process, its threads and its finished child processes)."""

    wall: float
    cpu: float


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(fn) -> tuple[Cost, object]:
    wall, cpu = time.perf_counter(), _cpu()
    out = fn()
    return Cost(time.perf_counter() - wall, _cpu() - cpu), out


def raw_read(urls: list[str]) -> int:
    """Read every byte of the shards with plain unbuffered 4 MiB reads; returns the byte count."""
    total = 0
    for url in urls:
        with open(url, "rb", buffering=0) as f:
            while block := f.read(1 << 22):
                total += len(block)
    return total


class PeakMemory:
    """Samples the PSS of this process and its children every 50 ms in a thread; ``peak`` is the maximum seen.

    PSS, not RSS: a forked loader worker shares the parent's pages (torch's libraries), which RSS counts twice.
    """

    def __init__(self) -> None:
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _pss(self) -> int:
        total = self.proc.memory_full_info().pss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_full_info().pss
            except psutil.NoSuchProcess:
                pass
        return total

    def __enter__(self) -> PeakMemory:
        self.base = self._pss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._pss())
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_loader(root: str, index: dict, args: argparse.Namespace, shape: tuple[int, int, int]):
    cfg = DataConfig(shards=root, crop_shape=shape, shuffle_buffer=args.shuffle_buffer, num_workers=args.workers)
    masks = MultiBlockMasks(EncoderConfig(size="tiny", input_shape=shape).grid, MaskConfig())
    return build_train_loader(
        cfg, index=index, batch_size=args.batch, masks=masks, seed=0, epoch=0, host_index=0, host_count=1
    )


def run_loader(loader) -> int:
    return sum(int(b["volume"].shape[0]) for b in loader)


def _memory_pass(root: str, index: dict, args: argparse.Namespace, shape: tuple[int, int, int], out) -> None:
    loader = make_loader(root, index, args, shape)  # outside: mask calibration is a one-off, not the loader's
    with PeakMemory() as mem:
        run_loader(loader)
    out.put(mem.peak - mem.base)


def peak_memory_growth(root: str, index: dict, args: argparse.Namespace, shape: tuple[int, int, int]) -> int:
    """Bytes of PSS growth over one epoch, in a fresh process: here, malloc keeps the memory of the timed epochs
    and the growth would look smaller than it is (and the sampling thread would perturb the timings)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_memory_pass, args=(root, index, args, shape, out))
    proc.start()
    growth = out.get()
    proc.join()
    return growth


def make_jpeg2000_dicom(path: str, rng: np.random.Generator) -> None:
    """One realistic JPEG 2000 lossless Maestro2 OCT DICOM at the device's real size, via synth.dicom."""
    from synth.devices import DEVICES
    from synth.dicom import dataset_bytes, new_uid, oct_dataset

    device = DEVICES[DEVICE]
    volume = realistic_volume(device.shape, device.spacing_mm, rng)
    ds = oct_dataset(
        volume=volume,
        spacing_mm=device.spacing_mm,
        device=device,
        participant_id="bench",
        laterality="R",
        sop_instance_uid=new_uid(rng),
        reference_uid=new_uid(rng),
        rng=rng,
    )
    with open(path, "wb") as f:
        f.write(dataset_bytes(ds))


def per_sample_path(path: str, target: tuple[int, int, int]) -> np.ndarray:
    """What training did before shards, every time a sample is used: decode the DICOM (beam_jobs.dicom) and
    resample it to the training grid (beam_jobs.resample, with the preprocessing job's default spacing)."""
    from beam_jobs.config import PreprocessConfig
    from beam_jobs.dicom import read_oct_dicom
    from beam_jobs.resample import resample_to_grid

    with open(path, "rb") as f:
        volume, header = read_oct_dicom(f, name=path)
    return resample_to_grid(volume, header.spacing_mm, PreprocessConfig().target_spacing_mm, target).volume


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = tuple(args.shape)
    work = args.workdir or tempfile.mkdtemp(prefix="loader-bench-")
    root = os.path.join(work, "set")
    t0 = time.perf_counter()
    index = reusable_set(root, bench_config(args))
    reuse = index is not None
    if index is None:
        index = write_shard_set(root, args.samples, shape, args.samples_per_shard, bench_config(args), args.relist)
    urls = shards.shard_urls(root, index, "train")
    sample_bytes = int(np.prod(shape))
    made = "reused" if reuse else "written"
    print(
        f"shard set: {args.samples} samples of {shape} uint8 ({sample_bytes / 2**20:.1f} MiB each) in "
        f"{len(set(urls))} shard files, listed {args.relist}x in the index, under {root} "
        f"({made} in {time.perf_counter() - t0:.1f} s)"
    )

    raw_read(urls)  # warm the page cache: both paths then read from memory
    if args.workers == 0:
        # In this process the loader runs as a DataLoader worker does, on one intra-op thread (torch gives each
        # worker one): with more, torch's thread pool spins between the loader's small tensor ops (masks) and the
        # process's CPU time would count the spinning as loader cost.
        torch.set_num_threads(1)
    loader = make_loader(root, index, args, shape)
    raw_costs, loader_costs = [], []
    for _ in range(args.repeats):  # interleaved, best of each: other processes on the machine add noise
        raw_costs.append(measure(lambda: raw_read(urls))[0])
        gc.collect()
        cost, count = measure(lambda: run_loader(loader))
        loader_costs.append(cost)
    assert count == len(loader) * args.batch, (count, len(loader), args.batch)
    n_raw = args.samples * args.relist
    raw = Cost(min(c.wall for c in raw_costs) / n_raw, min(c.cpu for c in raw_costs) / n_raw)
    load = Cost(min(c.wall for c in loader_costs) / count, min(c.cpu for c in loader_costs) / count)
    print(
        f"raw read:     {1 / raw.cpu:8.1f} samples/s per core (CPU {raw.cpu * 1e3:.2f} ms/sample, "
        f"wall {raw.wall * 1e3:.2f} ms/sample)"
    )
    print(
        f"loader:       {1 / load.cpu:8.1f} samples/s per core (CPU {load.cpu * 1e3:.2f} ms/sample, wall "
        f"{load.wall * 1e3:.2f} ms/sample; workers={args.workers}, batch={args.batch}, "
        f"shuffle_buffer={args.shuffle_buffer})"
    )
    print(
        f"cost ratio:   loader / raw read = {load.cpu / raw.cpu:.2f}x CPU per sample "
        f"({load.wall / raw.wall:.2f}x wall) (target <= 3)"
    )
    growth = peak_memory_growth(root, index, args, shape)
    buffer_mib = args.shuffle_buffer * sample_bytes / 2**20
    batch_mib = args.batch * sample_bytes / 2**20
    print(
        f"peak memory:  PSS grew {growth / 2**20:.0f} MiB during one epoch; the shuffle buffer "
        f"holds {buffer_mib:.0f} MiB ({args.shuffle_buffer} volumes), a batch {batch_mib:.0f} MiB "
        f"(workers={args.workers})"
    )

    if args.skip_dicom:
        return 0
    dcm = os.path.join(work, f"{DEVICE}.dcm")
    t0 = time.perf_counter()
    if not os.path.exists(dcm):  # encoding takes about a minute; a --workdir keeps it
        make_jpeg2000_dicom(dcm, np.random.default_rng(1))
    from synth.devices import DEVICES

    print(
        f"per-sample:   one JPEG 2000 lossless {DEVICE} DICOM {DEVICES[DEVICE].shape} uint8 (synth), "
        f"{os.path.getsize(dcm) / 2**20:.1f} MiB (made in {time.perf_counter() - t0:.1f} s)"
    )
    costs = []
    for _ in range(args.dicom_repeats):
        cost, out = measure(lambda: per_sample_path(dcm, shape))
        costs.append(cost)
    assert out.shape == shape, out.shape
    per = Cost(min(c.wall for c in costs), min(c.cpu for c in costs))
    print(
        f"per-sample:   CPU {per.cpu:.2f} s/sample, wall {per.wall:.2f} s/sample to decode + resample to {shape} "
        f"(best of {len(costs)})"
    )
    print(
        f"speed-up:     per-sample path / loader = {per.cpu / load.cpu:.0f}x CPU per sample "
        f"({per.wall / load.wall:.0f}x wall) (target >= 100)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
