"""A synthetic AI-READI-like retinal OCT dataset: real data cannot be downloaded, so this looks like it to the pipeline.

    octjepa synth --out /tmp/aireadi --participants 10 --scale 0.25 --seed 0
    octjepa synth --out /tmp/aireadi --participants 4 --scale 0.1 --broken    # plus one row per bad-input kind
    octjepa synth --out gs://bucket/aireadi --participants 10 --scale 0.25

Writes ``retinal_oct/structural_oct/<device>/<participant_id>/<file>.dcm`` (Ophthalmic Tomography DICOMs with the
functional-group layout of the real files: PixelMeasures shared, one OphthalmicFrameLocation per frame), the
reference fundus images they point to, ``retinal_oct/manifest.tsv`` (AI-READI columns, in order; ``filepath`` is
relative to the root) and ``participants.tsv`` at the root, as in the AI-READI release.
Per device the real frames x rows x columns and spacings (``synth.devices``); ``--scale`` shrinks the grid while
keeping the physical extent. JPEG 2000 lossless for most files, uncompressed for some; Zeiss Cirrus files carry the
lateral spacing in SliceThickness (their real quirk); some Spectralis optic-disc scans are radial.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from shards import storage
from synth.bad_inputs import write_bad_inputs
from synth.devices import (
    ALL_DEVICES,
    CIRRUS_200,
    DEVICES,
    ONH_CIRCLES,
    ONH_RADIAL_FRAMES,
    ScannerModel,
    scaled_geometry,
)
from synth.dicom import (
    dataset_bytes,
    new_uid,
    oct_dataset,
    radial_frame_locations,
    raster_frame_locations,
    reference_image_bytes,
)
from synth.layout import MANIFEST_COLUMNS, PARTICIPANT_COLUMNS, oct_path
from synth.volumes import ANATOMY_COLUMNS, STUDY_GROUPS, Anatomy, draw_anatomy, render_volume

ANATOMY_TABLE_COLUMNS = (
    "participant_id",
    "sop_instance_uid",
    "device",
    "laterality",
    "anatomic_region",
    "study_group",
) + ANATOMY_COLUMNS
CLINICAL_SITES = ("UAB", "UCSD", "UW")
ANATOMY_TABLE = "synth_anatomy.tsv"  # at the dataset root, beside participants.tsv


@dataclass(frozen=True)
class Scan:
    device: ScannerModel
    laterality: str
    region: str  # "Macula" or "Optic Disc"
    protocol: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    radial: bool


def _scans_for(participant: int, devices: Sequence[str], rng: np.random.Generator, onh_radial: bool) -> list[Scan]:
    chosen = {devices[participant % len(devices)]}
    for name in devices:
        if rng.random() < 0.3:
            chosen.add(name)
    scans = []
    for name in sorted(chosen):
        device = DEVICES[name]
        shape, spacing = device.shape, device.spacing_mm
        protocol = "mac"
        if name == "zeiss_cirrus" and rng.random() < 0.4:
            shape, spacing = CIRRUS_200
            protocol = "mac200"
        for lat in ("R", "L"):
            scans.append(Scan(device, lat, "Macula", protocol, shape, spacing, False))
        if name == "heidelberg_spectralis" and onh_radial and rng.random() < 0.5:
            d, h, w = device.shape
            scans.append(
                Scan(
                    device,
                    str(rng.choice(["R", "L"])),
                    "Optic Disc",
                    "onh_rc",
                    (ONH_RADIAL_FRAMES + ONH_CIRCLES, h, w),
                    device.spacing_mm,
                    True,
                )
            )
    return scans


def _tsv(rows: list[dict[str, Any]], columns: Sequence[str], heading: Sequence[str]) -> str:
    lines = ["\t".join(heading)] + ["\t".join(str(r[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def _splits(n: int, rng: np.random.Generator) -> list[str]:
    """train/val/test about 70/15/15, at least one of each once there are three participants."""
    n_val = max(1, round(0.15 * n)) if n >= 3 else 0
    n_test = max(1, round(0.15 * n)) if n >= 3 else 0
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return [splits[i] for i in rng.permutation(n)]


def generate_dataset(
    root: str,
    *,
    participants: int,
    scale: float,
    seed: int,
    devices: Sequence[str] = ALL_DEVICES,
    person_id_heading: bool = False,
    uncompressed_fraction: float = 0.2,
    onh_radial: bool = True,
    broken: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the dataset under ``root`` (local path or gs://); returns a summary (counts, paths)."""
    unknown = sorted(set(devices) - set(DEVICES))
    if unknown:
        raise ValueError(f"unknown device(s) {unknown}; expected some of {ALL_DEVICES}")
    if participants < 1 or not 0 < scale <= 1:
        raise ValueError(f"need participants >= 1 and 0 < scale <= 1, found {participants} and {scale}")
    rng = np.random.default_rng(seed)
    ids = [str(1001 + i) for i in range(participants)]
    splits = _splits(participants, rng)
    people, manifest, anatomy_rows, counts = [], [], [], {name: 0 for name in devices}
    for p, pid in enumerate(ids):
        group = STUDY_GROUPS[int(rng.integers(len(STUDY_GROUPS)))]
        people.append(
            {
                "participant_id": pid,
                "clinical_site": CLINICAL_SITES[int(rng.integers(3))],
                "study_group": group,
                "age": int(rng.integers(40, 86)),
                "recommended_split": splits[p],
                "retinal_oct": "TRUE",
            }
        )
        anatomy = draw_anatomy(group, rng)
        for scan in _scans_for(p, list(devices), rng, onh_radial):
            row, known = _write_scan(root, pid, anatomy, scan, scale, rng, uncompressed_fraction)
            manifest.append(row)
            anatomy_rows.append(
                {
                    "participant_id": pid,
                    "sop_instance_uid": row["sop_instance_uid"],
                    "device": scan.device.name,
                    "laterality": scan.laterality,
                    "anatomic_region": scan.region,
                    "study_group": group,
                    **known,
                }
            )
            counts[scan.device.name] += 1
            if progress:
                progress(manifest[-1]["filepath"])

    heading = ("person_id",) + MANIFEST_COLUMNS[1:] if person_id_heading else MANIFEST_COLUMNS
    manifest_url = storage.join(root, "retinal_oct", "manifest.tsv")  # where AI-READI keeps it
    with storage.open_url(manifest_url, "wb") as f:
        f.write(_tsv(manifest, MANIFEST_COLUMNS, heading).encode())
    participants_url = storage.join(root, "participants.tsv")
    with storage.open_url(participants_url, "wb") as f:
        f.write(_tsv(people, PARTICIPANT_COLUMNS, PARTICIPANT_COLUMNS).encode())
    anatomy_url = storage.join(root, ANATOMY_TABLE)
    with storage.open_url(anatomy_url, "wb") as f:
        f.write(_tsv(anatomy_rows, ANATOMY_TABLE_COLUMNS, ANATOMY_TABLE_COLUMNS).encode())
    summary: dict[str, Any] = {
        "root": root,
        "manifest": manifest_url,
        "participants_tsv": participants_url,
        "anatomy_tsv": anatomy_url,
        "participants": participants,
        "volumes": len(manifest),
        "by_device": counts,
        "files": [r["filepath"] for r in manifest],
    }
    if broken:
        summary["bad_inputs"] = write_bad_inputs(root, manifest_url)
    return summary


def _write_scan(
    root: str,
    pid: str,
    anatomy: Anatomy,
    scan: Scan,
    scale: float,
    rng: np.random.Generator,
    uncompressed_fraction: float,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Write one OCT file and its fundus reference; returns its manifest row and its known anatomy values."""
    device = scan.device
    shape, spacing = scaled_geometry(scan.shape, scan.spacing_mm, scale)
    if scan.radial:  # the radial + circle frame count is the protocol's, not a grid to shrink
        shape = (ONH_RADIAL_FRAMES + ONH_CIRCLES,) + shape[1:]
    volume, known = render_volume(shape, spacing, style=device.style, anatomy=anatomy, rng=rng, radial=scan.radial)
    uid, ref_uid = new_uid(rng), new_uid(rng)
    d, h, w = shape
    ref_size = max(64, round(768 * scale))
    per_frame_spacing = None
    if scan.radial:
        locations = radial_frame_locations(ONH_RADIAL_FRAMES, ONH_CIRCLES, w, spacing[2], ref_size)
        circle = [2 * math.pi * (w - 1) * spacing[2] / 2 * (0.5 + 0.2 * c) / w for c in range(ONH_CIRCLES)]
        per_frame_spacing = [(spacing[1], spacing[2])] * ONH_RADIAL_FRAMES + [(spacing[1], c) for c in circle]
    else:
        locations = raster_frame_locations(d, w, spacing[0], spacing[2], ref_size)
    ts = ExplicitVRLittleEndian if rng.random() < uncompressed_fraction else JPEG2000Lossless
    ds = oct_dataset(
        volume=volume,
        spacing_mm=spacing,
        device=device,
        participant_id=pid,
        laterality=scan.laterality,
        sop_instance_uid=uid,
        reference_uid=ref_uid,
        rng=rng,
        transfer_syntax=ts,
        frame_locations=locations,
        per_frame_spacing=per_frame_spacing,
    )
    name = f"{pid}_{device.short}_{scan.protocol}_oct_{scan.laterality.lower()}_{uid}.dcm"
    rel = oct_path(device.name, pid, name)
    with storage.open_url(storage.join(root, rel), "wb") as f:
        f.write(dataset_bytes(ds))
    ref_name = f"{pid}_{device.short}_{device.reference}_{scan.laterality.lower()}_{ref_uid}.dcm"
    ref_rel = f"retinal_photography/{device.reference}/{device.name}/{pid}/{ref_name}"
    with storage.open_url(storage.join(root, ref_rel), "wb") as f:
        f.write(reference_image_bytes(ref_size, ref_uid, pid, scan.laterality, device, rng))
    thickness = spacing[2] if device.slice_thickness_is_lateral else spacing[0]
    return {
        "participant_id": pid,
        "manufacturer": device.manufacturer,
        "manufacturers_model_name": device.model,
        "anatomic_region": scan.region,
        "imaging": "OCT",
        "laterality": scan.laterality,
        "height": h,
        "width": w,
        "number_of_frames": d,
        "pixel_spacing": "Varies by frame" if scan.radial else f"[{spacing[1]:.6g}, {spacing[2]:.6g}]",
        "slice_thickness": "Not reported" if scan.radial else f"{thickness:.6g}",
        "sop_instance_uid": uid,
        "filepath": "/" + rel,
        "reference_instance_uid": ref_uid,
        "reference_filepath": "/" + ref_rel,
    }, known


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="octjepa synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root (local path or gs://bucket/prefix)")
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--scale", type=float, default=0.25, help="grid scale per axis (1.0 = real device size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", default=",".join(ALL_DEVICES), help="comma-separated device folders")
    parser.add_argument("--person-id", action="store_true", help="manifest heading person_id (newer release)")
    parser.add_argument("--uncompressed-fraction", type=float, default=0.2)
    parser.add_argument("--no-onh", action="store_true", help="no Spectralis optic-disc radial scans")
    parser.add_argument("--broken", action="store_true", help="append one manifest row per bad-input kind")
    args = parser.parse_args(argv)
    summary = generate_dataset(
        args.out,
        participants=args.participants,
        scale=args.scale,
        seed=args.seed,
        devices=[d for d in args.devices.split(",") if d],
        person_id_heading=args.person_id,
        uncompressed_fraction=args.uncompressed_fraction,
        onh_radial=not args.no_onh,
        broken=args.broken,
    )
    summary.pop("files")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
