"""The OCT DICOM reader: synthetic files of every device and transfer syntax, pydicom's own test files (written by
other software, some deliberately broken), the spacing rules, and the guards that run before any pixel decode."""

from __future__ import annotations

import glob
import io
import os
import tracemalloc

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from beam_jobs.dicom import OPT_SOP_CLASS, REASONS, DicomReadError, read_header, read_oct_dicom
from synth.devices import DEVICES, scaled_geometry
from synth.dicom import dataset_bytes, oct_dataset, radial_frame_locations
from synth.volumes import oct_volume

SMALL = (6, 40, 32)
SMALL_SPACING = (0.1, 0.01, 0.05)


def _dataset(volume=None, *, spacing=SMALL_SPACING, ts=ExplicitVRLittleEndian, device="topcon_maestro2", **kw):
    rng = np.random.default_rng(0)
    if volume is None:
        volume = rng.integers(0, 250, size=SMALL, dtype=np.uint8)
    return oct_dataset(
        volume=volume,
        spacing_mm=spacing,
        device=DEVICES[device],
        participant_id="1001",
        laterality="L",
        sop_instance_uid="1.2.3.4",
        reference_uid="1.2.3.5",
        rng=rng,
        transfer_syntax=ts,
        **kw,
    )


def _read(ds: Dataset, **kw):
    return read_oct_dicom(dataset_bytes(ds), name="test.dcm", **kw)


def _reason(ds_or_bytes, **kw) -> DicomReadError:
    data = ds_or_bytes if isinstance(ds_or_bytes, bytes) else dataset_bytes(ds_or_bytes)
    with pytest.raises(DicomReadError) as info:
        read_oct_dicom(data, name="test.dcm", **kw)
    assert info.value.reason in REASONS
    assert info.value.source == "test.dcm" and "test.dcm" in str(info.value)
    return info.value


# --- every device, every transfer syntax ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_each_device_round_trips_with_its_geometry(name):
    device = DEVICES[name]
    shape, spacing = scaled_geometry(device.shape, device.spacing_mm, 0.06)
    volume = oct_volume(shape, spacing, style=device.style, study_group="healthy", rng=np.random.default_rng(1))
    ds = _dataset(volume, spacing=spacing, ts=JPEG2000Lossless, device=name)
    out, header = read_oct_dicom(io.BytesIO(dataset_bytes(ds)), name="test.dcm")  # a file object, too
    np.testing.assert_array_equal(out, volume)
    assert header.shape == shape and header.manufacturer == device.manufacturer and header.model == device.model
    assert header.sop_class_uid == OPT_SOP_CLASS and header.laterality == "L"
    np.testing.assert_allclose(header.spacing_mm, spacing, rtol=1e-4)
    assert header.spacing_source[1].startswith("SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]")
    if device.slice_thickness_is_lateral:  # the Cirrus quirk: frame locations win over SliceThickness
        assert "OphthalmicFrameLocationSequence" in header.spacing_source[0]
        assert any("SliceThickness" in w for w in header.warnings)
    else:
        assert header.spacing_source[0].endswith("SliceThickness") and header.warnings == ()


@pytest.mark.parametrize(
    "ts,dtype",
    [
        (ExplicitVRLittleEndian, np.uint8),
        (ExplicitVRLittleEndian, np.uint16),
        (ImplicitVRLittleEndian, np.uint8),
        (ImplicitVRLittleEndian, np.uint16),
        (JPEG2000Lossless, np.uint8),
        (JPEG2000Lossless, np.uint16),
        (RLELossless, np.uint8),
        (RLELossless, np.uint16),
        (JPEG2000, np.uint8),
        (JPEGBaseline8Bit, np.uint8),
    ],
)
def test_transfer_syntaxes_decode_to_the_source_bit_depth(ts, dtype):
    peak = np.iinfo(dtype).max
    volume = oct_volume(
        SMALL,
        SMALL_SPACING,
        style=DEVICES["topcon_triton"].style,
        study_group="healthy",
        rng=np.random.default_rng(2),
        dtype=dtype,
    )
    volume = (volume.astype(np.float64) * 0.9).astype(dtype)  # headroom for lossy overshoot
    out, header = _read(_dataset(volume, ts=ts))
    assert out.dtype == dtype and out.shape == SMALL and header.transfer_syntax_uid == ts
    if ts in (JPEG2000, JPEGBaseline8Bit):
        error = np.abs(out.astype(np.float64) - volume).mean() / peak
        assert error < 0.05 and np.corrcoef(out.ravel(), volume.ravel())[0, 1] > 0.8
        assert any("lossy" in w for w in header.warnings)
    else:
        np.testing.assert_array_equal(out, volume)


def test_monochrome1_is_inverted_to_monochrome2():
    volume = np.random.default_rng(3).integers(0, 256, size=SMALL, dtype=np.uint8)
    ds = _dataset(volume)
    ds.PhotometricInterpretation = "MONOCHROME1"
    out, header = _read(ds)
    np.testing.assert_array_equal(out, 255 - volume)
    assert header.photometric == "MONOCHROME1" and "MONOCHROME1 inverted to MONOCHROME2" in header.warnings


def test_decoding_memory_stays_near_one_decoded_volume():
    volume = np.random.default_rng(4).integers(0, 256, size=(48, 200, 160), dtype=np.uint8)
    data = dataset_bytes(_dataset(volume, ts=JPEG2000Lossless))
    tracemalloc.start()
    out, _ = read_oct_dicom(data, name="test.dcm")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # One decoded volume + the encoded bytes (copied once for parsing) + a frame or two, not a second volume.
    assert peak < out.nbytes + 2.5 * len(data) + 0.25 * out.nbytes


# --- spacing ----------------------------------------------------------------------------------------------------


def test_spacing_order_shared_then_per_frame_then_top_level():
    ds = _dataset()
    ds.PixelSpacing, ds.SliceThickness = ["0.5", "0.5"], "0.5"  # top level: loses to the functional groups
    header = read_header(dataset_bytes(ds), name="test.dcm")
    assert header.spacing_mm == pytest.approx(SMALL_SPACING)
    assert header.spacing_source == (
        "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness",
        "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]",
        "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]",
    )
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    for item in ds.PerFrameFunctionalGroupsSequence:  # per frame, all equal
        pm = Dataset()
        pm.PixelSpacing, pm.SliceThickness = ["0.02", "0.05"], "0.1"
        item.PixelMeasuresSequence = [pm]
    header = read_header(dataset_bytes(ds), name="test.dcm")
    assert header.spacing_mm == pytest.approx((0.1, 0.02, 0.05))
    assert header.spacing_source[1] == "PerFrameFunctionalGroupsSequence[*].PixelMeasuresSequence[0].PixelSpacing[0]"
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PixelMeasuresSequence
        del item.OphthalmicFrameLocationSequence  # no positions: SliceThickness is the only pitch
    header = read_header(dataset_bytes(ds), name="test.dcm")
    assert header.spacing_mm == pytest.approx((0.5, 0.5, 0.5))
    assert header.spacing_source == ("SliceThickness", "PixelSpacing[0]", "PixelSpacing[1]")


def test_spacing_between_slices_is_the_last_resort_for_the_pitch():
    ds = _dataset()
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.OphthalmicFrameLocationSequence
    ds.SpacingBetweenSlices = "0.2"
    header = read_header(dataset_bytes(ds), name="test.dcm")
    assert header.spacing_mm[0] == pytest.approx(0.2) and header.spacing_source[0] == "SpacingBetweenSlices"


def test_plane_positions_override_a_disagreeing_slice_thickness():
    ds = _dataset()
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        del item.OphthalmicFrameLocationSequence
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 0.25 * i]
        item.PlanePositionSequence = [pos]
    header = read_header(dataset_bytes(ds), name="test.dcm")
    assert header.spacing_mm[0] == pytest.approx(0.25)
    assert "PlanePositionSequence" in header.spacing_source[0]
    assert any("0.1 mm" in w and "0.25 mm" in w for w in header.warnings)


def test_cirrus_quirk_pitch_comes_from_frame_locations():
    # Real Cirrus 512x128 cube: SliceThickness holds the lateral spacing, 4x smaller than the true pitch.
    spacing = DEVICES["zeiss_cirrus"].spacing_mm
    volume = np.zeros((128, 4, 512), dtype=np.uint8)
    header = read_header(dataset_bytes(_dataset(volume, spacing=spacing, device="zeiss_cirrus")), name="test.dcm")
    assert header.spacing_mm[0] == pytest.approx(spacing[0], rel=1e-3)
    assert header.spacing_mm[0] / spacing[2] == pytest.approx(4.0, rel=0.03)


@pytest.mark.parametrize(
    "value,reason,path",
    [
        (None, "missing_spacing", "PixelMeasuresSequence[0]"),
        ("0", "implausible_spacing", "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]"),
        ("-0.01", "implausible_spacing", "PixelSpacing[1]"),
        ("3.5", "implausible_spacing", "PixelSpacing[1]"),
        ("0.0001", "implausible_spacing", "PixelSpacing[1]"),
    ],
)
def test_spacing_is_never_invented(value, reason, path):
    ds = _dataset()
    pm = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if value is None:
        del pm.PixelSpacing
    else:
        pm.PixelSpacing = ["0.01", value]
    error = _reason(ds)
    assert error.reason == reason and path in str(error)


def test_radial_and_varying_scans_are_non_raster():
    ds = _dataset()
    radial = radial_frame_locations(SMALL[0], 0, SMALL[2], 0.05, 768)
    for item, coords in zip(ds.PerFrameFunctionalGroupsSequence, radial):
        item.OphthalmicFrameLocationSequence[0].ReferenceCoordinates = coords
    assert "not parallel" in str(_reason(ds, max_decoded_bytes=10**9))
    ds = _dataset(per_frame_spacing=[(0.01, 0.05 + 0.01 * i) for i in range(SMALL[0])])
    error = _reason(ds)
    assert error.reason == "non_raster_scan" and "varies by frame" in str(error)


# --- guards before decoding ---------------------------------------------------------------------------------------


def test_bomb_guard_runs_before_any_decode():
    from pydicom.encaps import encapsulate

    ds = _dataset(ts=JPEG2000Lossless)
    ds.PixelData = encapsulate([b"noise, not a codestream"] * SMALL[0])  # would fail if decoded
    error = _reason(ds, max_decoded_bytes=SMALL[0] * SMALL[1] * SMALL[2] - 1)
    assert error.reason == "too_large" and "max_decoded_bytes" in str(error)


def test_read_header_decodes_no_pixels():
    ds = _dataset(ts=JPEG2000Lossless)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f not a codestream"] * SMALL[0])
    header = read_header(dataset_bytes(ds), name="test.dcm")
    assert header.shape == SMALL
    assert _reason(ds).reason == "corrupt_codestream"


def test_other_sop_classes_need_permission_and_a_grayscale_volume():
    ds = _dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    error = _reason(ds)
    assert error.reason == "wrong_sop_class" and "CT Image Storage" in str(error) and OPT_SOP_CLASS in str(error)
    out, header = _read(ds, allow_other_sop_classes=True)
    assert out.shape == SMALL and header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"


def test_truncated_and_empty_inputs():
    whole = dataset_bytes(_dataset())
    for cut in (200, len(whole) // 2, len(whole) - 10):
        assert _reason(whole[:cut]).reason == "truncated"
    assert _reason(b"").reason == "not_dicom"
    assert _reason(b"\x00" * 2000).reason == "not_dicom"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each damaged element it reads
def test_random_byte_damage_never_escapes_as_another_exception():
    rng = np.random.default_rng(0)
    reasons = set()
    for ts in (ExplicitVRLittleEndian, JPEG2000Lossless):
        good = dataset_bytes(_dataset(ts=ts))
        for _ in range(150):
            damaged = bytearray(good)
            for _ in range(int(rng.integers(1, 6))):  # mostly in the header, where the checks are
                damaged[int(rng.integers(0, 3000 if rng.random() < 0.7 else len(good)))] = int(rng.integers(0, 256))
            try:
                volume, header = read_oct_dicom(bytes(damaged), name="test.dcm")
            except DicomReadError as exc:
                reasons.add(exc.reason)
                continue
            assert volume.shape == header.shape
    assert {"truncated", "malformed_header", "corrupt_codestream"} <= reasons


# --- DICOM files written by other software (shipped inside pydicom) ----------------------------------------------


def _as_oct(name: str) -> tuple[bytes, Dataset]:
    """A pydicom test file relabelled as OCT with plausible spacing, codestream untouched."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = OPT_SOP_CLASS
    ds.PixelSpacing, ds.SliceThickness = ["0.0039", "0.0117"], "0.047"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue(), ds


@pytest.mark.parametrize(
    "name",
    ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm", "JPGExtended.dcm", "CT_small.dcm"],
)
def test_codestreams_from_other_encoders_decode_like_pydicom(name):
    data, ds = _as_oct(name)
    out, header = read_oct_dicom(data, name=name)
    expected = ds.pixel_array.reshape(out.shape)
    np.testing.assert_array_equal(out.astype(np.int64), expected.astype(np.int64))
    assert out.dtype == np.uint16 and header.bits_allocated == 16


@pytest.mark.parametrize(
    "name,reason",
    [
        ("JPEG2000.dcm", "unsupported_pixel_format"),  # signed 16-bit with negative values
        ("JPEG-lossy.dcm", "corrupt_codestream"),  # libjpeg rejects its misplaced marker
        ("JPEG2000-embedded-sequence-delimiter.dcm", "corrupt_codestream"),
    ],
)
def test_broken_or_foreign_codestreams_fail_with_a_reason(name, reason):
    data, _ = _as_oct(name)
    with pytest.raises(DicomReadError) as info:
        read_oct_dicom(data, name=name)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "name,allow,reason",
    [
        ("MR_small.dcm", False, "wrong_sop_class"),
        ("MR_truncated.dcm", True, "truncated"),
        ("rtplan_truncated.dcm", True, "truncated"),
        ("no_meta.dcm", True, "not_dicom"),
        ("ExplVR_BigEnd.dcm", True, "unsupported_transfer_syntax"),
        ("JPEGLSNearLossless_08.dcm", True, "unsupported_transfer_syntax"),
        ("SC_rgb_jpeg.dcm", True, "not_grayscale"),
        ("rtdose.dcm", True, "unsupported_pixel_format"),  # multi-frame, 32-bit
        ("liver_1frame.dcm", True, "unsupported_pixel_format"),  # functional groups, 1-bit segmentation
        ("rtplan.dcm", True, "no_pixel_data"),
        ("CT_small.dcm", True, "implausible_spacing"),  # 5 mm slices are not OCT
        ("JPEG2000.dcm", True, "implausible_spacing"),  # 2.26 mm pixels (and no slice spacing)
    ],
)
def test_pydicom_test_files_fail_with_clear_reasons(name, allow, reason):
    with pytest.raises(DicomReadError) as info:
        read_oct_dicom(open(get_testdata_file(name), "rb"), name=name, allow_other_sop_classes=allow)
    assert info.value.reason == reason and name in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_pydicom_test_file_decodes_or_fails_with_a_reason():
    folder = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    files = sorted(glob.glob(os.path.join(folder, "*.dcm")))
    assert len(files) > 50
    decoded = 0
    for path in files:
        try:
            volume, header = read_oct_dicom(open(path, "rb").read(), name=path, allow_other_sop_classes=True)
        except DicomReadError as exc:
            assert exc.reason in REASONS
            continue
        decoded += 1
        assert volume.ndim == 3 and volume.dtype in (np.uint8, np.uint16) and volume.shape == header.shape
    assert decoded >= 3  # the MR_small family
