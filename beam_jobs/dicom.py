"""Reading one OCT DICOM: bytes or a file object -> ``(volume (D, H, W), OctHeader)``. Plain functions, no Beam.

Every header check (SOP class, transfer syntax, pixel format, frame count, decompression-bomb guard, spacing)
runs before any pixel is decoded (``read_header``); ``read_oct_dicom`` then decodes frame by frame into one
preallocated array, so memory stays near one decoded volume. Bad input raises ``DicomReadError`` whose ``reason``
is one of ``REASONS`` and whose message says what was expected, what was found, and the tag path.

    from beam_jobs.dicom import read_oct_dicom
    volume, header = read_oct_dicom(open("scan.dcm", "rb"), name="scan.dcm")
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import iter_pixels
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
)

from beam_jobs.config import DEFAULT_MAX_DECODED_BYTES
from beam_jobs.spacing import SpacingError, resolve_spacing

OPT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage

REASONS = frozenset(
    {
        "not_dicom",
        "truncated",
        "no_pixel_data",
        "wrong_sop_class",
        "missing_spacing",
        "implausible_spacing",
        "corrupt_codestream",
        "too_large",
        "zero_frames",
        "not_grayscale",
        "non_raster_scan",
        "unsupported_transfer_syntax",
        "unsupported_pixel_format",
        "malformed_header",
    }
)

SUPPORTED_TRANSFER_SYNTAXES = {
    ExplicitVRLittleEndian: "explicit VR little endian",
    ImplicitVRLittleEndian: "implicit VR little endian",
    JPEG2000Lossless: "JPEG 2000 lossless",
    JPEG2000: "JPEG 2000",
    JPEGBaseline8Bit: "JPEG baseline",
    JPEGExtended12Bit: "JPEG extended",
    RLELossless: "RLE lossless",
}
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class DicomReadError(ValueError):
    """A file the pipeline cannot turn into a volume; ``reason`` is one of REASONS, ``source`` names the file."""

    def __init__(self, reason: str, source: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"DicomReadError: unknown reason {reason!r}, expected one of {sorted(REASONS)}")
        super().__init__(f"{source}: {reason}: {message}")
        self.reason = reason
        self.source = source


@dataclass(frozen=True)
class OctHeader:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    manufacturer: str
    model: str
    laterality: str
    frames: int
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    photometric: str
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    spacing_source: tuple[str, str, str]
    warnings: tuple[str, ...]
    patient_id: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.rows, self.columns)

    @property
    def decoded_bytes(self) -> int:
        return self.frames * self.rows * self.columns * ((self.bits_allocated + 7) // 8)


# What pydicom raises when a header element's bytes cannot be interpreted (elements are converted lazily).
_HEADER_ERRORS = (
    BytesLengthException,
    NotImplementedError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    EOFError,
)


class _ShortReadWatch(io.BytesIO):
    """pydicom stops quietly at a short read; this notices one, which means the file was cut off."""

    short_read = False

    def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        # A clean end of file is an empty 8-byte probe for the next tag; anything else short is a cut value.
        if size is not None and size > 0 and len(data) < size and not (len(data) == 0 and size == 8):
            self.short_read = True
        return data


def _parse(source: bytes | BinaryIO, name: str) -> pydicom.Dataset:
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else source.read()
    if len(data) == 0:
        raise DicomReadError("not_dicom", name, "expected a DICOM file, found 0 bytes")
    buf = _ShortReadWatch(bytes(data))
    try:
        ds = pydicom.dcmread(buf)
    except InvalidDicomError as exc:
        raise DicomReadError("not_dicom", name, f"expected a DICOM file (128-byte preamble + 'DICM'): {exc}") from exc
    except (OSError, *_HEADER_ERRORS) as exc:
        kind = "truncated" if buf.short_read or isinstance(exc, EOFError) else "malformed_header"
        detail = f"{type(exc).__name__}: {exc}"
        raise DicomReadError(kind, name, f"the DICOM data set could not be parsed: {detail}") from exc
    if buf.short_read:
        raise DicomReadError("truncated", name, f"the file ends inside a data element ({len(data)} bytes read)")
    return ds


def _int(ds: Any, keyword: str, name: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise DicomReadError("malformed_header", name, f"{keyword} is missing, the Image Pixel module requires it")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DicomReadError("malformed_header", name, f"{keyword} is {value!r}, expected an integer") from exc


def _laterality(ds: Any) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        if ds.get(keyword):
            return str(ds.get(keyword))
    shared = ds.get("SharedFunctionalGroupsSequence")
    anatomy = shared[0].get("FrameAnatomySequence") if shared else None
    if anatomy and anatomy[0].get("FrameLaterality"):
        return str(anatomy[0].FrameLaterality)
    return ""


def _check_header(ds: pydicom.Dataset, name: str, max_decoded_bytes: int, allow_other: bool) -> OctHeader:
    try:
        return _header(ds, name, max_decoded_bytes, allow_other)
    except DicomReadError:
        raise
    except _HEADER_ERRORS as exc:
        raise DicomReadError(
            "malformed_header",
            name,
            f"a header element cannot be read: {type(exc).__name__}: {exc}",
        ) from exc


def _header(ds: pydicom.Dataset, name: str, max_decoded_bytes: int, allow_other: bool) -> OctHeader:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class != OPT_SOP_CLASS and not allow_other:
        found = f"{sop_class} ({pydicom.uid.UID(sop_class).name})" if sop_class else "none"
        raise DicomReadError(
            "wrong_sop_class",
            name,
            f"SOPClassUID is {found}, expected Ophthalmic Tomography Image Storage ({OPT_SOP_CLASS})",
        )
    if "PixelData" not in ds:
        raise DicomReadError("no_pixel_data", name, "the data set has no Pixel Data (7FE0,0010) element")

    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        found = f"{ts} ({pydicom.uid.UID(ts).name})" if ts else "none in the file meta"
        supported = ", ".join(SUPPORTED_TRANSFER_SYNTAXES.values())
        raise DicomReadError(
            "unsupported_transfer_syntax",
            name,
            f"transfer syntax is {found}, expected one of: {supported}",
        )

    samples = _int(ds, "SamplesPerPixel", name)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(
            "not_grayscale",
            name,
            f"SamplesPerPixel is {samples} and PhotometricInterpretation is {photometric!r}, "
            "expected 1 sample, MONOCHROME1 or MONOCHROME2",
        )
    bits_allocated = _int(ds, "BitsAllocated", name)
    bits_stored = _int(ds, "BitsStored", name)
    _int(ds, "PixelRepresentation", name)  # required by the decoders too
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise DicomReadError(
            "unsupported_pixel_format",
            name,
            f"BitsAllocated is {bits_allocated} and BitsStored {bits_stored}, expected 8 or 16 bits allocated",
        )

    frames = _int(ds, "NumberOfFrames", name, 1)
    rows, columns = _int(ds, "Rows", name), _int(ds, "Columns", name)
    if frames <= 0:
        raise DicomReadError("zero_frames", name, f"NumberOfFrames is {frames}, expected at least 1")
    if rows <= 0 or columns <= 0:
        raise DicomReadError("no_pixel_data", name, f"Rows x Columns is {rows} x {columns}, expected positive sizes")
    decoded = frames * rows * columns * (bits_allocated // 8)
    if decoded > max_decoded_bytes:
        raise DicomReadError(
            "too_large",
            name,
            f"NumberOfFrames x Rows x Columns x bytes = {frames} x {rows} x {columns} x {bits_allocated // 8} = "
            f"{decoded} bytes decoded, above the limit of {max_decoded_bytes} (max_decoded_bytes)",
        )

    try:
        spacing = resolve_spacing(ds, columns=columns)
    except SpacingError as exc:
        raise DicomReadError(exc.reason, name, str(exc)) from exc

    if ts in _NATIVE and len(ds.PixelData) < decoded:
        raise DicomReadError(
            "truncated",
            name,
            f"Pixel Data holds {len(ds.PixelData)} bytes, the header declares {decoded}",
        )
    warnings = list(spacing.warnings)
    if photometric == "MONOCHROME1":
        warnings.append("MONOCHROME1 inverted to MONOCHROME2")
    if ts in (JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit) and ds.get("LossyImageCompression", "") != "00":
        warnings.append(f"lossy transfer syntax ({SUPPORTED_TRANSFER_SYNTAXES[ts]})")
    return OctHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        transfer_syntax_uid=ts,
        manufacturer=str(ds.get("Manufacturer", "")),
        model=str(ds.get("ManufacturerModelName", "")),
        laterality=_laterality(ds),
        frames=frames,
        rows=rows,
        columns=columns,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        photometric=photometric,
        spacing_mm=spacing.spacing_mm,
        spacing_source=spacing.source,
        warnings=tuple(warnings),
        patient_id=str(ds.get("PatientID", "")).strip(),
    )


def read_header(
    source: bytes | BinaryIO,
    *,
    name: str,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    allow_other_sop_classes: bool = False,
) -> OctHeader:
    """All header checks, including spacing and the decompression-bomb guard; decodes no pixel."""
    return _check_header(_parse(source, name), name, max_decoded_bytes, allow_other_sop_classes)


def _decode(ds: pydicom.Dataset, header: OctHeader, name: str) -> np.ndarray:
    dtype = np.uint8 if header.bits_allocated == 8 else np.uint16
    volume = np.empty(header.shape, dtype=dtype)  # (D, H, W), filled one decoded frame at a time
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    native = header.transfer_syntax_uid in _NATIVE
    count = 0
    try:
        for i, frame in enumerate(iter_pixels(ds)):
            if i >= header.frames:
                break
            if frame.shape != (header.rows, header.columns):
                raise DicomReadError(
                    "corrupt_codestream",
                    name,
                    f"frame {i} decodes to shape {frame.shape}, the header declares {(header.rows, header.columns)}",
                )
            if signed and frame.min() < 0:
                raise DicomReadError(
                    "unsupported_pixel_format",
                    name,
                    f"frame {i} holds negative values (PixelRepresentation 1); OCT intensities are unsigned",
                )
            volume[i] = frame
            count += 1
    except DicomReadError:
        raise
    except (RuntimeError, OSError, *_HEADER_ERRORS) as exc:
        reason = "truncated" if native else "corrupt_codestream"
        raise DicomReadError(
            reason,
            name,
            f"frame {count} of {header.frames} failed to decode "
            f"({SUPPORTED_TRANSFER_SYNTAXES[header.transfer_syntax_uid]}): {type(exc).__name__}: {exc}",
        ) from exc
    if count != header.frames:
        raise DicomReadError(
            "truncated" if native else "corrupt_codestream",
            name,
            f"Pixel Data holds {count} frames, the header declares NumberOfFrames {header.frames}",
        )
    if header.photometric == "MONOCHROME1":
        np.subtract((1 << header.bits_stored) - 1, volume, out=volume)
    return volume


def read_oct_dicom(
    source: bytes | BinaryIO,
    *,
    name: str,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    allow_other_sop_classes: bool = False,
) -> tuple[np.ndarray, OctHeader]:
    """``(volume (D, H, W) uint8/uint16 MONOCHROME2, header)``; raises DicomReadError on bad input."""
    ds = _parse(source, name)
    header = _check_header(ds, name, max_decoded_bytes, allow_other_sop_classes)
    return _decode(ds, header, name), header
