"""The synthetic AI-READI-like dataset: layout, manifest and participants columns, agreement between the manifest
and the DICOM headers, determinism, the study-group signal, the bad-input corpus, and the per-volume sample."""

from __future__ import annotations

import csv
import hashlib
import os

import numpy as np
import pytest

from beam_jobs.config import load_preprocess_config
from beam_jobs.dicom import DicomReadError, read_header, read_oct_dicom
from beam_jobs.resample import resample_to_grid
from beam_jobs.volume_to_sample import dicom_to_sample
from shards import decode_sample
from synth import volumes as synth_volumes
from synth.bad_inputs import write_bad_inputs
from synth.dataset import ANATOMY_TABLE, ANATOMY_TABLE_COLUMNS, generate_dataset, main
from synth.devices import CIRRUS_200, DEVICES, scaled_geometry
from synth.layout import MANIFEST_COLUMNS, PARTICIPANT_COLUMNS
from synth.volumes import ANATOMY_COLUMNS, STUDY_GROUPS, Pathology, draw_anatomy, oct_volume, render_volume

SCALE = 0.06


def _tsv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    summary = generate_dataset(root, participants=6, scale=SCALE, seed=3, uncompressed_fraction=0.3)
    return root, summary


def test_layout_and_manifest_columns(dataset):
    root, summary = dataset
    rows = _tsv(os.path.join(root, "retinal_oct", "manifest.tsv"))
    assert tuple(rows[0]) == MANIFEST_COLUMNS and len(rows) - 1 == summary["volumes"]
    records = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert {r["filepath"].split("/")[3] for r in records} == set(DEVICES)  # every device appears
    for r in records:
        parts = r["filepath"].split("/")
        assert r["filepath"].startswith("/retinal_oct/structural_oct/") and parts[4] == r["participant_id"]
        assert os.path.exists(root + r["filepath"]) and os.path.exists(root + r["reference_filepath"])
        assert r["imaging"] == "OCT" and r["laterality"] in ("L", "R")
    macula = [r for r in records if r["anatomic_region"] == "Macula"]
    for pid in {r["participant_id"] for r in records}:  # both eyes per device
        eyes = {(r["filepath"].split("/")[3], r["laterality"]) for r in macula if r["participant_id"] == pid}
        assert {lat for _, lat in eyes} == {"L", "R"}
    onh = [r for r in records if r["anatomic_region"] == "Optic Disc"]
    assert onh and all(
        r["pixel_spacing"] == "Varies by frame"
        and r["slice_thickness"] == "Not reported"
        and r["number_of_frames"] == "27"
        for r in onh
    )


def test_manifest_agrees_with_the_dicom_headers(dataset):
    root, _ = dataset
    rows = _tsv(os.path.join(root, "retinal_oct", "manifest.tsv"))
    syntaxes = set()
    for r in (dict(zip(rows[0], r)) for r in rows[1:]):
        with open(root + r["filepath"], "rb") as f:
            data = f.read()
        if r["anatomic_region"] == "Optic Disc":
            with pytest.raises(DicomReadError) as info:
                read_header(data, name=r["filepath"])
            assert info.value.reason == "non_raster_scan"
            continue
        header = read_header(data, name=r["filepath"])
        syntaxes.add(header.transfer_syntax_uid)
        assert header.sop_instance_uid == r["sop_instance_uid"]
        assert header.shape == (int(r["number_of_frames"]), int(r["height"]), int(r["width"]))
        assert (header.manufacturer, header.model, header.laterality) == (
            r["manufacturer"],
            r["manufacturers_model_name"],
            r["laterality"],
        )
        dy, dx = (float(v) for v in r["pixel_spacing"].strip("[]").split(","))
        assert header.spacing_mm[1:] == pytest.approx((dy, dx), rel=1e-4)
        device = DEVICES[r["filepath"].split("/")[3]]
        if device.slice_thickness_is_lateral:
            # Cirrus: the manifest repeats SliceThickness (= lateral spacing); the reader finds the real pitch.
            cube = CIRRUS_200 if "_mac200_" in r["filepath"] else (device.shape, device.spacing_mm)
            pitch = scaled_geometry(*cube, SCALE)[1][0]
            assert float(r["slice_thickness"]) == pytest.approx(dx, rel=1e-4)
            assert header.spacing_mm[0] == pytest.approx(pitch, rel=1e-3)
        else:
            assert header.spacing_mm[0] == pytest.approx(float(r["slice_thickness"]), rel=1e-4)
    assert syntaxes == {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"}  # J2K lossless and uncompressed


def test_participants_file(dataset):
    root, _ = dataset
    rows = _tsv(os.path.join(root, "participants.tsv"))
    assert tuple(rows[0]) == PARTICIPANT_COLUMNS and len(rows) == 7
    records = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert all(r["study_group"] in STUDY_GROUPS and r["clinical_site"] for r in records)
    assert {r["recommended_split"] for r in records} == {"train", "val", "test"}
    assert all(40 <= int(r["age"]) <= 90 and r["retinal_oct"] == "TRUE" for r in records)


def test_deterministic_for_a_seed_and_person_id_heading(tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(name.encode() + f.read())
        return h.hexdigest()

    kw = dict(participants=2, scale=SCALE, devices=("topcon_triton", "zeiss_cirrus"))
    generate_dataset(str(tmp_path / "a"), seed=5, **kw)
    generate_dataset(str(tmp_path / "b"), seed=5, **kw)
    generate_dataset(str(tmp_path / "c"), seed=6, person_id_heading=True, **kw)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    heading = _tsv(tmp_path / "c" / "retinal_oct" / "manifest.tsv")[0]
    assert heading[0] == "person_id" and tuple(heading[1:]) == MANIFEST_COLUMNS[1:]


def _retina_thickness_rows(volume: np.ndarray) -> float:
    """Median ILM-to-RPE distance over A-scans: first row above half the brightest level, to the brightest row."""
    kernel = np.ones(5) / 5
    smooth = np.apply_along_axis(lambda a: np.convolve(a, kernel, mode="same"), 1, volume.astype(np.float64))
    top = smooth.max(axis=1, keepdims=True)
    ilm = np.argmax(smooth > 0.45 * top, axis=1)
    rpe = np.argmax(smooth, axis=1)
    return float(np.median(rpe - ilm))


def test_study_group_leaves_a_visible_trace():
    style = DEVICES["heidelberg_spectralis"].style
    shape, spacing = (6, 496, 96), (0.2, 0.003872, 0.09)  # full axial resolution, few A-scans
    healthy = oct_volume(shape, spacing, style=style, study_group="healthy", rng=np.random.default_rng(0))
    insulin = oct_volume(shape, spacing, style=style, study_group="insulin_dependent", rng=np.random.default_rng(0))
    assert _retina_thickness_rows(insulin) < _retina_thickness_rows(healthy) - 3  # thinner inner retina
    again = oct_volume(shape, spacing, style=style, study_group="healthy", rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again, healthy)


def test_anatomy_table_holds_every_volumes_known_values(dataset):
    root, summary = dataset
    assert summary["anatomy_tsv"].endswith(ANATOMY_TABLE)
    rows = _tsv(os.path.join(root, ANATOMY_TABLE))
    assert tuple(rows[0]) == ANATOMY_TABLE_COLUMNS
    table = [dict(zip(rows[0], r)) for r in rows[1:]]
    manifest = _tsv(os.path.join(root, "retinal_oct", "manifest.tsv"))
    uids = [dict(zip(manifest[0], r))["sop_instance_uid"] for r in manifest[1:]]
    assert [r["sop_instance_uid"] for r in table] == uids  # one row per OCT volume, in manifest order
    participants = _tsv(os.path.join(root, "participants.tsv"))
    people = {r[0]: dict(zip(participants[0], r)) for r in participants[1:]}
    by_participant = {}
    for r in table:
        assert r["study_group"] == people[r["participant_id"]]["study_group"]
        values = {c: float(r[c]) for c in ANATOMY_COLUMNS}
        assert 0 < values["inner_thickness_mm"] < values["retina_thickness_mm"] < 0.5
        assert values["foci_count"] >= 0 and values["cyst_volume_mm3"] >= 0
        # The participant's own parameters are shared by all their scans; depth, foci and cysts vary per scan.
        shared = tuple(values[c] for c in ("retina_thickness_mm", "inner_thinning", "curvature_per_mm", "pit_depth"))
        assert by_participant.setdefault(r["participant_id"], shared) == shared


def test_study_group_means_move_thinning_foci_and_cysts():
    rng = np.random.default_rng(0)
    draws = {g: [draw_anatomy(g, rng) for _ in range(200)] for g in (STUDY_GROUPS[0], STUDY_GROUPS[3])}
    healthy, insulin = draws[STUDY_GROUPS[0]], draws[STUDY_GROUPS[3]]
    mean = lambda group, name: float(np.mean([getattr(a, name) for a in group]))  # noqa: E731
    assert mean(insulin, "inner_thinning") - mean(healthy, "inner_thinning") > 0.35
    assert mean(insulin, "foci_rate") > 10 * mean(healthy, "foci_rate")
    assert mean(healthy, "cyst_rate") == 0 < mean(insulin, "cyst_rate")
    # Anatomy that is not the group's varies as much in either group (a target the group does not give away).
    assert abs(mean(insulin, "retina_scale") - mean(healthy, "retina_scale")) < 0.03


DEMO_SPACING, DEMO_SHAPE = (0.4, 0.04, 0.1), (16, 64, 64)  # the demo's preprocessing grid


def _at_demo_grid(anatomy, path, monkeypatch):
    """One Spectralis macula volume at the demo's synthetic scale with a given pathology, resampled as the demo
    preprocesses it."""
    monkeypatch.setattr(synth_volumes, "make_pathology", lambda anatomy, extent, rng: path)
    shape, spacing = scaled_geometry((61, 496, 768), (0.1208, 0.003872, 0.01136), 0.15)
    volume, _ = render_volume(
        shape, spacing, style=DEVICES["heidelberg_spectralis"].style, anatomy=anatomy, rng=np.random.default_rng(7)
    )
    return resample_to_grid(volume, spacing, DEMO_SPACING, DEMO_SHAPE).volume.astype(np.float64)


def test_study_group_signal_is_visible_at_the_demo_grid(monkeypatch):
    from dataclasses import replace

    anatomy = replace(draw_anatomy("healthy", np.random.default_rng(1)), inner_thinning=0.0, retina_scale=1.0)
    none = Pathology(thinning=0.0, foci=np.zeros((0, 3)), cysts=np.zeros((0, 4)))
    healthy = _at_demo_grid(anatomy, none, monkeypatch)
    # The insulin-dependent group's mean inner-retina thinning: at least one axial voxel of the demo grid thinner.
    thin = _at_demo_grid(replace(anatomy, inner_thinning=0.45), replace(none, thinning=0.45), monkeypatch)
    assert _retina_thickness_rows(thin) <= _retina_thickness_rows(healthy) - 1
    # Foci and cysts away from the fovea: each changes the demo-grid voxels where it lies.
    spots = np.array([[zc, xc, 0.6] for zc in (-2.4, -0.8, 0.8, 2.4) for xc in (-2.0, 2.0)])
    foci = _at_demo_grid(anatomy, replace(none, foci=spots), monkeypatch)
    cysts = _at_demo_grid(
        anatomy, replace(none, cysts=np.array([[1.6, -1.6, 0.2, 0.5], [-1.6, 1.6, 0.2, 0.5]])), monkeypatch
    )
    for changed, where in ((foci, spots[:, :2]), (cysts, np.array([[1.6, -1.6], [-1.6, 1.6]]))):
        for zc, xc in where:
            d = int(round(zc / DEMO_SPACING[0] + (DEMO_SHAPE[0] - 1) / 2))
            w = int(round(xc / DEMO_SPACING[2] + (DEMO_SHAPE[2] - 1) / 2))
            patch = np.abs(changed - healthy)[max(d - 1, 0) : d + 2, :, max(w - 1, 0) : w + 2]
            assert patch.max() > 40, (zc, xc)  # of 255: a visible spot, not a rounding difference


def test_bad_inputs_fail_each_with_its_reason(tmp_path):
    root = str(tmp_path)
    summary = generate_dataset(root, participants=1, scale=SCALE, seed=1, devices=("topcon_maestro2",), broken=True)
    expected = summary["bad_inputs"]
    assert set(expected.values()) == {
        "missing_file",
        "malformed_row",
        "truncated",
        "not_dicom",
        "no_pixel_data",
        "wrong_sop_class",
        "missing_spacing",
        "implausible_spacing",
        "corrupt_codestream",
        "too_large",
        "zero_frames",
        "not_grayscale",
        "non_raster_scan",
    }
    rows = _tsv(os.path.join(root, "retinal_oct", "manifest.tsv"))
    seen = {}
    for n, values in enumerate(rows[1:], start=1):
        if len(values) != len(MANIFEST_COLUMNS):
            seen[f"row:{n}"] = "malformed_row"
            continue
        r = dict(zip(rows[0], values))
        if r["sop_instance_uid"] not in expected:
            read_oct_dicom(open(root + r["filepath"], "rb"), name=r["filepath"])  # the good rows still read
            continue
        if not os.path.exists(root + r["filepath"]):
            seen[r["sop_instance_uid"]] = "missing_file"
            continue
        with pytest.raises(DicomReadError) as info:
            read_oct_dicom(open(root + r["filepath"], "rb").read(), name=r["filepath"])
        seen[r["sop_instance_uid"]] = info.value.reason
        assert r["filepath"] in str(info.value)
    assert seen == expected
    with pytest.raises(ValueError, match="heading"):
        write_bad_inputs(root, os.path.join(root, "participants.tsv"))


def test_dicom_to_sample_fills_the_contract(dataset):
    root, _ = dataset
    rows = _tsv(os.path.join(root, "retinal_oct", "manifest.tsv"))
    r = next(dict(zip(rows[0], v)) for v in rows[1:] if "topcon_triton" in v[12])
    row = {
        "participant_id": r["participant_id"],
        "device": "topcon_triton",
        "laterality": r["laterality"],
        "anatomic_region": r["anatomic_region"],
        "sop_instance_uid": r["sop_instance_uid"],
        "filepath": r["filepath"],
    }
    config = load_preprocess_config(None, ["target_shape=[16,64,64]"])
    data = open(root + r["filepath"], "rb").read()
    volume, meta = decode_sample(dicom_to_sample(data, row=row, config=config, split="val"))
    source, header = read_oct_dicom(data, name="x")
    assert volume.shape == (16, 64, 64) and volume.dtype == source.dtype
    assert meta["source_shape"] == list(source.shape) and meta["split"] == "val"
    assert meta["source_spacing_mm"] == pytest.approx(list(header.spacing_mm))
    assert meta["target_spacing_mm"] == [0.05, 0.02, 0.02] and meta["source_path"] == r["filepath"]
    assert 0 < meta["fill_fraction"] <= 1 and meta["intensity_mean"] > 0
    assert {k: meta[k] for k in ("participant_id", "device", "laterality", "sop_instance_uid")} == {
        k: row[k] for k in ("participant_id", "device", "laterality", "sop_instance_uid")
    }
    with pytest.raises(DicomReadError):
        dicom_to_sample(b"not a dicom", row=row, config=config, split="val")


def test_cli_writes_a_dataset(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--participants",
                "1",
                "--scale",
                str(SCALE),
                "--devices",
                "heidelberg_spectralis",
                "--no-onh",
            ]
        )
        == 0
    )
    assert '"volumes": 2' in capsys.readouterr().out
    assert len(_tsv(tmp_path / "retinal_oct" / "manifest.tsv")) == 3


def test_writes_to_gcs(gcs):
    from shards import storage

    root = storage.join(gcs, "aireadi")
    summary = generate_dataset(
        root, participants=1, scale=SCALE, seed=0, devices=("topcon_maestro2",), onh_radial=False
    )
    assert summary["manifest"] == storage.join(root, "retinal_oct", "manifest.tsv")
    lines = storage.read_bytes(summary["manifest"]).decode().splitlines()
    assert len(lines) == 1 + summary["volumes"] == 3
    first = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
    volume, header = read_oct_dicom(storage.read_bytes(storage.join(root, first["filepath"])), name=first["filepath"])
    assert header.sop_instance_uid == first["sop_instance_uid"] and volume.shape == header.shape
