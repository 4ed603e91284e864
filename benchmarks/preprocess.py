"""Per-volume preprocessing cost at real device sizes: decode alone vs bytes-in to encoded-sample-out, and memory.

    python benchmarks/preprocess.py                                  # the four devices at real size (~3-4 min)
    python benchmarks/preprocess.py --quick                          # Spectralis only, the smallest (<1 min)
    python benchmarks/preprocess.py --devices topcon_triton --config configs/preprocess_native.yaml --repeats 3

For each device a synthetic OCT volume of the real frames x rows x columns is written as a JPEG 2000 lossless
DICOM (the AI-READI encoding; generation is not timed). Each volume is then measured in a fresh subprocess:

- decode_s: ``read_oct_dicom`` (parse, header checks, frame-by-frame decode): the floor;
- full_s: ``dicom_to_sample`` (the same read + resample + crop/pad + metadata + encode), what the Beam job calls;
- ratio = full_s / decode_s, target <= 1.10 (resampling must add at most 10 % to the decode), in wall time and in
  this process's CPU time ("cpu f/d": robust when other work shares the machine); resample_s times
  ``resample_to_grid`` alone on the decoded volume, which is most of the difference and far less noisy;
- full cpu s: the CPU seconds of ``dicom_to_sample``, i.e. vCPU-seconds per volume, what a Dataflow run's size is
  estimated from (README, "Preprocessing on Dataflow");
- traced_peak / decoded: tracemalloc's peak during ``dicom_to_sample`` over the decoded volume's bytes, target <= 3.
  tracemalloc sees numpy's and Python's allocations, not the C decoder's internal buffers (openjpeg's per-frame
  work memory), so the process's peak RSS growth over its pre-call RSS is printed too (rss_growth / decoded),
  measured in the same fresh process after a warm-up on a tiny volume (so imports and decoder loading are not
  counted) and before anything else ran.

Timings are the minimum over ``--repeats`` runs of each in that process; the first full run also gives the RSS
figure. The generated DICOMs are cached (``--cache-dir``) since encoding them costs more than measuring them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, _ROOT)

TARGET_RATIO, TARGET_MEMORY = 1.10, 3.0
CACHE_VERSION = 1  # bump when the synthetic volumes change


def write_volume(device_name: str, scale: float, folder: str, name: str = "") -> str:
    import numpy as np
    from pydicom.uid import JPEG2000Lossless

    from synth.devices import DEVICES, scaled_geometry
    from synth.dicom import dataset_bytes, oct_dataset
    from synth.volumes import oct_volume

    device = DEVICES[device_name]
    shape, spacing = scaled_geometry(device.shape, device.spacing_mm, scale)
    rng = np.random.default_rng(0)
    volume = oct_volume(shape, spacing, style=device.style, study_group="insulin_dependent", rng=rng)
    ds = oct_dataset(
        volume=volume,
        spacing_mm=spacing,
        device=device,
        participant_id="1001",
        laterality="R",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
        reference_uid="1.2.826.0.1.3680043.8.498.2",
        rng=rng,
        transfer_syntax=JPEG2000Lossless,
    )
    path = os.path.join(folder, name or f"{device_name}.dcm")
    with open(path, "wb") as f:
        f.write(dataset_bytes(ds))
    return path


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time is what contention on a shared machine spares."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(path: str, device: str, config_path: str | None, repeats: int) -> dict:
    """Runs inside a fresh process: warm-up, a full run (RSS growth, first timing), timings, a traced full run."""
    import tracemalloc

    import psutil

    from beam_jobs.config import load_preprocess_config
    from beam_jobs.dicom import read_oct_dicom
    from beam_jobs.resample import resample_to_grid
    from beam_jobs.volume_to_sample import dicom_to_sample

    config = load_preprocess_config(config_path)
    with open(path, "rb") as f:
        data = f.read()
    row = {
        "participant_id": "1001",
        "device": device,
        "laterality": "R",
        "anatomic_region": "Macula",
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "filepath": "/" + os.path.basename(path),
    }

    def full():
        return dicom_to_sample(data, row=row, config=config, split="train")

    # Warm up on a tiny volume so lazily loaded decoders and imports are not counted as the volume's memory.
    small = write_volume("heidelberg_spectralis", 0.06, os.path.dirname(path), name="warmup.dcm")
    with open(small, "rb") as f:
        dicom_to_sample(f.read(), row=row, config=config, split="train")
    rss_before = psutil.Process().memory_info().rss
    _, *first = timed(full)
    full_s, full_cpu = [first[0]], [first[1]]
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    decode_s, decode_cpu, resample_s = [], [], []
    for i in range(repeats):
        (volume, header), wall, cpu = timed(lambda: read_oct_dicom(data, name=path))
        decode_s.append(wall)
        decode_cpu.append(cpu)
        _, wall, _ = timed(
            partial(resample_to_grid, volume, header.spacing_mm, config.target_spacing_mm, config.target_shape)
        )
        resample_s.append(wall)
        del volume
        if i > 0:
            _, wall, cpu = timed(full)
            full_s.append(wall)
            full_cpu.append(cpu)
    tracemalloc.start()
    full()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    decoded = header.decoded_bytes
    return {
        "device": device,
        "shape": list(header.shape),
        "file_mb": round(len(data) / 2**20, 1),
        "decoded_mb": round(decoded / 2**20, 1),
        "decode_s": round(min(decode_s), 3),
        "full_s": round(min(full_s), 3),
        "resample_s": round(min(resample_s), 3),
        "ratio": round(min(full_s) / min(decode_s), 3),
        "cpu_ratio": round(min(full_cpu) / min(decode_cpu), 3),
        "full_cpu_s": round(min(full_cpu), 3),
        "traced_peak_over_decoded": round(traced_peak / decoded, 2),
        "rss_growth_over_decoded": round((rss_peak - rss_before) / decoded, 2),
    }


def main(argv: list[str] | None = None) -> int:
    from synth.devices import ALL_DEVICES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default=",".join(ALL_DEVICES))
    parser.add_argument("--scale", type=float, default=1.0, help="grid scale per axis (1.0 = real size)")
    parser.add_argument("--quick", action="store_true", help="heidelberg_spectralis only (the smallest real volume)")
    parser.add_argument("--config", default=None, help="preprocess preset YAML (default: the seed preset)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "octjepa-bench-preprocess"),
        help="keep the generated DICOMs here between runs ('' = a temporary folder)",
    )
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process
        print(json.dumps(measure(args.measure[0], args.measure[1], args.config, args.repeats)))
        return 0
    devices = ["heidelberg_spectralis"] if args.quick else args.devices.split(",")
    scale = args.scale
    print(
        f"preprocess benchmark: scale {scale}, config {args.config or 'seed defaults'}, repeats {args.repeats}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'device':22s} {'shape':>13s} {'file MB':>7s} {'decode s':>8s} {'full s':>7s} {'full/dec':>8s} "
        f"{'cpu f/d':>7s} {'full cpu s':>10s} {'resample s':>10s} {'traced/vol':>10s} {'rss/vol':>7s}"
    )
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.cache_dir or scratch
        os.makedirs(folder, exist_ok=True)
        for device in devices:
            path = os.path.join(folder, f"{device}-scale{scale:g}-v{CACHE_VERSION}.dcm")
            if not os.path.exists(path):  # generation is deterministic: a cached file is the same bytes
                t = time.perf_counter()
                os.replace(write_volume(device, scale, scratch), path)
                print(f"  wrote {device} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            cmd = [sys.executable, os.path.abspath(__file__), "--measure", path, device, "--repeats", str(args.repeats)]
            if args.config:
                cmd += ["--config", args.config]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=_ROOT).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(header)
    for r in results:
        shape = "x".join(str(n) for n in r["shape"])
        print(
            f"{r['device']:22s} {shape:>13s} {r['file_mb']:7.1f} {r['decode_s']:8.2f} {r['full_s']:7.2f} "
            f"{r['ratio']:8.3f} {r['cpu_ratio']:7.3f} {r['full_cpu_s']:10.2f} {r['resample_s']:10.3f} "
            f"{r['traced_peak_over_decoded']:10.2f} "
            f"{r['rss_growth_over_decoded']:7.2f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f} (timings compare only on an otherwise idle machine)")
    worst_ratio = max(r["ratio"] for r in results)
    worst_memory = max(r["traced_peak_over_decoded"] for r in results)
    worst_cpu = max(r["cpu_ratio"] for r in results)
    for what, value in (("wall", worst_ratio), ("CPU", worst_cpu)):
        verdict = "PASS" if value <= TARGET_RATIO else "FAIL"
        print(f"worst full/decode ({what} time) {value:.3f} (target <= {TARGET_RATIO}): {verdict}")
    print(
        f"worst traced peak / decoded volume {worst_memory:.2f} (target <= {TARGET_MEMORY}): "
        f"{'PASS' if worst_memory <= TARGET_MEMORY else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
