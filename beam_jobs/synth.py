"""A synthetic AI-READI-like retinal OCT dataset: real data cannot be downloaded, so this looks like it to the pipeline.

    octjepa synth --out /tmp/aireadi --participants 10 --scale 0.25 --seed 0
    octjepa synth --out /tmp/aireadi --participants 4 --scale 0.1 --broken    # plus one row per bad-input kind
    octjepa synth --out gs://bucket/aireadi --participants 10 --scale 0.25

Writes ``retinal_oct/structural_oct/<device>/<participant_id>/<file>.dcm`` (Ophthalmic Tomography DICOMs with the
functional-group layout of the real files: PixelMeasures shared, one OphthalmicFrameLocation per frame), the
reference fundus images they point to, ``retinal_oct/manifest.tsv`` (AI-READI columns, in order; ``filepath`` is
relative to the root) and ``participants.tsv`` at the root, as in the AI-READI release.
Per device the real frames x rows x columns and spacings (``DEVICES``); ``--scale`` shrinks the grid while keeping
the physical extent. JPEG 2000 lossless for most files, uncompressed for some; Zeiss Cirrus files carry the
lateral spacing in SliceThickness (their real quirk); some Spectralis optic-disc scans are radial.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import openjpeg
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
)

from beam_jobs.dicom import OPT_SOP_CLASS
from beam_jobs.synth_volumes import STUDY_GROUPS, Style, oct_volume
from shards import storage

OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage (the fundus reference)
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs

MANIFEST_COLUMNS = (
    "participant_id", "manufacturer", "manufacturers_model_name", "anatomic_region", "imaging", "laterality",
    "height", "width", "number_of_frames", "pixel_spacing", "slice_thickness", "sop_instance_uid", "filepath",
    "reference_instance_uid", "reference_filepath",
)
PARTICIPANT_COLUMNS = ("participant_id", "clinical_site", "study_group", "age", "recommended_split", "retinal_oct")
CLINICAL_SITES = ("UAB", "UCSD", "UW")


@dataclass(frozen=True)
class Device:
    name: str  # folder name in the AI-READI layout
    short: str  # in file names
    manufacturer: str
    model: str
    shape: tuple[int, int, int]  # (frames, rows, columns) of the real volumes
    spacing_mm: tuple[float, float, float]  # (B-scan pitch, row, column)
    reference: str  # the fundus image folder the OCT points to
    style: Style
    slice_thickness_is_lateral: bool = False  # the Cirrus quirk


DEVICES: dict[str, Device] = {
    "heidelberg_spectralis": Device(
        "heidelberg_spectralis", "spectralis", "Heidelberg Engineering", "Spectralis", (61, 496, 768),
        (0.1208, 0.003872, 0.01136), "ir", Style(gain=0.95, floor=0.03, speckle_k=6.0, retina_top=0.25)),
    "topcon_maestro2": Device(
        "topcon_maestro2", "maestro2", "Topcon", "Maestro2", (128, 885, 512),
        (0.04724, 0.0026, 0.01174), "cfp", Style(gain=0.70, floor=0.10, speckle_k=2.0, retina_top=0.35)),
    "topcon_triton": Device(
        "topcon_triton", "triton", "Topcon", "Triton", (256, 992, 512),
        (0.02745, 0.0026, 0.01370), "cfp", Style(gain=0.80, floor=0.07, speckle_k=2.5, retina_top=0.30)),
    "zeiss_cirrus": Device(
        "zeiss_cirrus", "cirrus", "Carl Zeiss Meditec", "Cirrus HD-OCT 5000", (128, 1024, 512),
        (0.04724, 0.001955, 0.01174), "ir", Style(gain=0.60, floor=0.12, speckle_k=1.5, retina_top=0.30),
        slice_thickness_is_lateral=True),
}
ALL_DEVICES = tuple(DEVICES)
CIRRUS_200 = ((200, 1024, 200), (0.03015, 0.001955, 0.03015))  # the 200x200 cube: lateral = pitch, quirk harmless
ONH_RADIAL_FRAMES, ONH_CIRCLES = 24, 3  # Spectralis ONH: 24 radial B-scans + 3 circle scans = 27 frames
# Field of view of the reference fundus image; its pixel size is not in the OCT file (as in the real data).
_REF_FOV_MM = 8.8
_MAX_SCALED_PITCH_MM = 0.4  # scaled-down volumes keep enough B-scans that the pitch stays plausible
_MIN_FRAME_SIDE = 32  # openjpeg encodes 6 wavelet resolutions, which needs frames of at least 32 x 32


def new_uid(rng: np.random.Generator) -> str:
    return UID_ROOT + ".".join(str(int(v)) for v in rng.integers(1, 2**31, size=3))


def scaled_geometry(
    shape: Sequence[int], spacing: Sequence[float], scale: float,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shrink a grid by ``scale`` per axis, keeping its physical extent (spacing grows to match)."""
    if scale == 1.0:
        return tuple(shape), tuple(spacing)
    out_shape, out_spacing = [], []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        extent = n * s
        m = max(_MIN_FRAME_SIDE if axis else 2, round(n * scale))
        if axis == 0:
            m = max(m, math.ceil(extent / _MAX_SCALED_PITCH_MM))
        out_shape.append(min(n, m))
        out_spacing.append(round(extent / min(n, m), 6))
    return tuple(out_shape), tuple(out_spacing)


# --- DICOM writing --------------------------------------------------------------------------------------------

def _encode_pixels(ds: Dataset, volume: np.ndarray, transfer_syntax: str) -> None:
    """Set PixelData for ``volume`` (D, H, W) in ``transfer_syntax`` (encoded frame by frame)."""
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.PixelData = np.ascontiguousarray(volume).tobytes()
        ds["PixelData"].VR = "OW" if volume.dtype == np.uint16 else "OB"
        return
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, np.ascontiguousarray(volume), generate_instance_uid=False)
        return
    frames = []
    for frame in volume:
        if transfer_syntax == JPEGBaseline8Bit:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=92)
            frames.append(buf.getvalue())
        elif transfer_syntax in (JPEG2000Lossless, JPEG2000):
            lossy = {"compression_ratios": [2.0]} if transfer_syntax == JPEG2000 else {}  # speckle barely compresses
            frames.append(openjpeg.encode(np.ascontiguousarray(frame), photometric_interpretation=2, use_mct=False,
                                          codec_format=0, **lossy))
        else:
            raise ValueError(f"synth cannot write transfer syntax {transfer_syntax}")
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if transfer_syntax != JPEG2000Lossless:
        ds.LossyImageCompression = "01"


def raster_frame_locations(d: int, w: int, dz: float, dx: float, ref_size: int) -> list[list[float]]:
    """ReferenceCoordinates (row, col of the line's start and end on the fundus image) for a raster of B-scans."""
    px = _REF_FOV_MM / ref_size
    centre, half = ref_size / 2, (w - 1) * dx / 2 / px
    return [[centre + (i - (d - 1) / 2) * dz / px, centre - half, centre + (i - (d - 1) / 2) * dz / px, centre + half]
            for i in range(d)]


def radial_frame_locations(n_radial: int, n_circles: int, w: int, dx: float, ref_size: int) -> list[list[float]]:
    centre, half = ref_size / 2, (w - 1) * dx / 2 / (_REF_FOV_MM / ref_size)
    lines = [[centre - half * math.sin(a), centre - half * math.cos(a), centre + half * math.sin(a),
              centre + half * math.cos(a)] for a in (math.pi * k / n_radial for k in range(n_radial))]
    for c in range(n_circles):
        radius = half * (0.5 + 0.2 * c)
        pts = [v for t in range(16) for v in (centre + radius * math.sin(2 * math.pi * t / 16),
                                              centre + radius * math.cos(2 * math.pi * t / 16))]
        lines.append(pts)
    return lines


def oct_dataset(
    *,
    volume: np.ndarray,
    spacing_mm: tuple[float, float, float],
    device: Device,
    participant_id: str,
    laterality: str,
    sop_instance_uid: str,
    reference_uid: str,
    rng: np.random.Generator,
    transfer_syntax: str = JPEG2000Lossless,
    frame_locations: list[list[float]] | None = None,
    per_frame_spacing: list[tuple[float, float]] | None = None,
) -> Dataset:
    """An Ophthalmic Tomography data set laid out like the AI-READI files (pixel data encoded)."""
    d, h, w = volume.shape
    dz, dy, dx = spacing_mm
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = OPT_SOP_CLASS, sop_instance_uid, "OPT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(rng), new_uid(rng)
    ds.Manufacturer, ds.ManufacturerModelName = device.manufacturer, device.model
    ds.PatientID, ds.ImageLaterality = participant_id, laterality
    ds.NumberOfFrames, ds.Rows, ds.Columns = d, h, w
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 * volume.dtype.itemsize
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0

    shared = Dataset()
    anatomy = Dataset()
    anatomy.FrameLaterality = laterality
    shared.FrameAnatomySequence = [anatomy]
    if per_frame_spacing is None:
        measures = Dataset()
        measures.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        measures.SliceThickness = f"{(dx if device.slice_thickness_is_lateral else dz):.6g}"
        shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    locations = frame_locations if frame_locations is not None else raster_frame_locations(d, w, dz, dx, 768)
    for i in range(d):
        item = Dataset()
        location = Dataset()
        location.ReferenceCoordinates = [float(v) for v in locations[i]]
        location.ReferencedSOPInstanceUID = reference_uid
        location.ReferencedSOPClassUID = OP_SOP_CLASS
        location.OphthalmicImageOrientation = "LINEAR" if len(locations[i]) == 4 else "NONLINEAR"
        item.OphthalmicFrameLocationSequence = [location]
        content = Dataset()
        content.InStackPositionNumber = i + 1
        item.FrameContentSequence = [content]
        if per_frame_spacing is not None:
            measures = Dataset()
            measures.PixelSpacing = [f"{per_frame_spacing[i][0]:.6g}", f"{per_frame_spacing[i][1]:.6g}"]
            item.PixelMeasuresSequence = [measures]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    _encode_pixels(ds, volume, transfer_syntax)
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def reference_image_bytes(size: int, sop_instance_uid: str, participant_id: str, laterality: str,
                          device: Device, rng: np.random.Generator) -> bytes:
    """A small fundus-like 2D image: what the OCT's frame locations and the manifest's reference_* point to."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    image = (90 + 60 * np.exp(-((xx - 0.2) ** 2 + yy**2) / 0.005) - 40 * np.exp(-(xx**2 + yy**2) / 0.01)
             + rng.normal(0, 8, (size, size))).clip(0, 255).astype(np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = OP_SOP_CLASS, sop_instance_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = OP_SOP_CLASS, sop_instance_uid, "OP"
    ds.Manufacturer, ds.ManufacturerModelName = device.manufacturer, device.model
    ds.PatientID, ds.ImageLaterality = participant_id, laterality
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = size, size, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = image.tobytes()
    return dataset_bytes(ds)


# --- the dataset ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scan:
    device: Device
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
            scans.append(Scan(device, str(rng.choice(["R", "L"])), "Optic Disc", "onh_rc",
                              (ONH_RADIAL_FRAMES + ONH_CIRCLES, h, w), device.spacing_mm, True))
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
    people, manifest, counts = [], [], {name: 0 for name in devices}
    for p, pid in enumerate(ids):
        group = STUDY_GROUPS[int(rng.integers(len(STUDY_GROUPS)))]
        people.append({"participant_id": pid, "clinical_site": CLINICAL_SITES[int(rng.integers(3))],
                       "study_group": group, "age": int(rng.integers(40, 86)), "recommended_split": splits[p],
                       "retinal_oct": "TRUE"})
        for scan in _scans_for(p, list(devices), rng, onh_radial):
            manifest.append(_write_scan(root, pid, group, scan, scale, rng, uncompressed_fraction))
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
    summary: dict[str, Any] = {
        "root": root, "manifest": manifest_url, "participants_tsv": participants_url, "participants": participants,
        "volumes": len(manifest), "by_device": counts, "files": [r["filepath"] for r in manifest],
    }
    if broken:
        from beam_jobs.bad_inputs import write_bad_inputs

        summary["bad_inputs"] = write_bad_inputs(root, manifest_url)
    return summary


def _write_scan(root: str, pid: str, group: str, scan: Scan, scale: float, rng: np.random.Generator,
                uncompressed_fraction: float) -> dict[str, Any]:
    device = scan.device
    shape, spacing = scaled_geometry(scan.shape, scan.spacing_mm, scale)
    if scan.radial:  # the radial + circle frame count is the protocol's, not a grid to shrink
        shape = (ONH_RADIAL_FRAMES + ONH_CIRCLES,) + shape[1:]
    volume = oct_volume(shape, spacing, style=device.style, study_group=group, rng=rng, radial=scan.radial)
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
    ds = oct_dataset(volume=volume, spacing_mm=spacing, device=device, participant_id=pid, laterality=scan.laterality,
                     sop_instance_uid=uid, reference_uid=ref_uid, rng=rng, transfer_syntax=ts,
                     frame_locations=locations, per_frame_spacing=per_frame_spacing)
    name = f"{pid}_{device.short}_{scan.protocol}_oct_{scan.laterality.lower()}_{uid}.dcm"
    rel = f"retinal_oct/structural_oct/{device.name}/{pid}/{name}"
    with storage.open_url(storage.join(root, rel), "wb") as f:
        f.write(dataset_bytes(ds))
    ref_name = f"{pid}_{device.short}_{device.reference}_{scan.laterality.lower()}_{ref_uid}.dcm"
    ref_rel = f"retinal_photography/{device.reference}/{device.name}/{pid}/{ref_name}"
    with storage.open_url(storage.join(root, ref_rel), "wb") as f:
        f.write(reference_image_bytes(ref_size, ref_uid, pid, scan.laterality, device, rng))
    thickness = spacing[2] if device.slice_thickness_is_lateral else spacing[0]
    return {
        "participant_id": pid, "manufacturer": device.manufacturer, "manufacturers_model_name": device.model,
        "anatomic_region": scan.region, "imaging": "OCT", "laterality": scan.laterality,
        "height": h, "width": w, "number_of_frames": d,
        "pixel_spacing": "Varies by frame" if scan.radial else f"[{spacing[1]:.6g}, {spacing[2]:.6g}]",
        "slice_thickness": "Not reported" if scan.radial else f"{thickness:.6g}",
        "sop_instance_uid": uid, "filepath": "/" + rel, "reference_instance_uid": ref_uid,
        "reference_filepath": "/" + ref_rel,
    }


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
        args.out, participants=args.participants, scale=args.scale, seed=args.seed,
        devices=[d for d in args.devices.split(",") if d], person_id_heading=args.person_id,
        uncompressed_fraction=args.uncompressed_fraction, onh_radial=not args.no_onh, broken=args.broken,
    )
    summary.pop("files")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
