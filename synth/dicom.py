"""The DICOM side of ``octjepa synth``: Ophthalmic Tomography files laid out like the AI-READI release (shared
PixelMeasures, one OphthalmicFrameLocation per frame), their fundus reference images, and the pixel encodings
(JPEG 2000, RLE, baseline JPEG, uncompressed) the pipeline must read.
"""

from __future__ import annotations

import io
import math

import numpy as np
import openjpeg
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from beam_jobs.dicom import OPT_SOP_CLASS
from synth.devices import ScannerModel

OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage (the fundus reference)
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs
# Field of view of the reference fundus image; its pixel size is not in the OCT file (as in the real data).
_REF_FOV_MM = 8.8


def new_uid(rng: np.random.Generator) -> str:
    return UID_ROOT + ".".join(str(int(v)) for v in rng.integers(1, 2**31, size=3))


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
            frames.append(
                openjpeg.encode(
                    np.ascontiguousarray(frame), photometric_interpretation=2, use_mct=False, codec_format=0, **lossy
                )
            )
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
    return [
        [centre + (i - (d - 1) / 2) * dz / px, centre - half, centre + (i - (d - 1) / 2) * dz / px, centre + half]
        for i in range(d)
    ]


def radial_frame_locations(n_radial: int, n_circles: int, w: int, dx: float, ref_size: int) -> list[list[float]]:
    centre, half = ref_size / 2, (w - 1) * dx / 2 / (_REF_FOV_MM / ref_size)
    lines = [
        [
            centre - half * math.sin(a),
            centre - half * math.cos(a),
            centre + half * math.sin(a),
            centre + half * math.cos(a),
        ]
        for a in (math.pi * k / n_radial for k in range(n_radial))
    ]
    for c in range(n_circles):
        radius = half * (0.5 + 0.2 * c)
        pts = [
            v
            for t in range(16)
            for v in (
                centre + radius * math.sin(2 * math.pi * t / 16),
                centre + radius * math.cos(2 * math.pi * t / 16),
            )
        ]
        lines.append(pts)
    return lines


def oct_dataset(
    *,
    volume: np.ndarray,
    spacing_mm: tuple[float, float, float],
    device: ScannerModel,
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


def reference_image_bytes(
    size: int,
    sop_instance_uid: str,
    participant_id: str,
    laterality: str,
    device: ScannerModel,
    rng: np.random.Generator,
) -> bytes:
    """A small fundus-like 2D image: what the OCT's frame locations and the manifest's reference_* point to."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    image = (
        (
            90
            + 60 * np.exp(-((xx - 0.2) ** 2 + yy**2) / 0.005)
            - 40 * np.exp(-(xx**2 + yy**2) / 0.01)
            + rng.normal(0, 8, (size, size))
        )
        .clip(0, 255)
        .astype(np.uint8)
    )
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
