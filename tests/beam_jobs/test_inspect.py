"""``octjepa inspect``: one JSON line per file with shape, spacing and where it came from, or the error's reason;
exit status 1 when any file failed; folders, --header-only and gs:// URLs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from beam_jobs import inspect
from shards import storage
from synth.bad_inputs import write_bad_inputs
from synth.dataset import generate_dataset
from synth.devices import DEVICES
from synth.dicom import dataset_bytes, oct_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inspect"))
    summary = generate_dataset(root, participants=1, scale=0.06, seed=2, devices=("zeiss_cirrus",), onh_radial=False)
    return root, summary


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_good_files_report_shape_spacing_and_sources(dataset, capsys):
    root, summary = dataset
    paths = [root + p for p in summary["files"]]
    assert inspect.main(paths) == 0
    reports = _lines(capsys)
    assert [r["path"] for r in reports] == paths
    for r in reports:
        assert r["sop_class_name"] == "Ophthalmic Tomography Image Storage"
        assert r["manufacturer"] == "Carl Zeiss Meditec" and r["model"] == "Cirrus HD-OCT 5000"
        assert len(r["shape"]) == 3 and len(r["spacing_mm"]) == 3 and r["dtype"] == "uint8"
        assert r["spacing_source"][1].endswith("PixelSpacing[0]") and r["spacing_source"][2].endswith("PixelSpacing[1]")
        assert r["intensity"]["max"] > r["intensity"]["min"]
    # The Cirrus quirk is reported: pitch from the frame locations, with a warning naming SliceThickness.
    quirk = [r for r in reports if "OphthalmicFrameLocationSequence" in r["spacing_source"][0]]
    assert quirk and all(any("SliceThickness" in w for w in r["warnings"]) for r in quirk)


def test_folder_with_bad_files_fails_with_reasons(tmp_path, capsys):
    root = str(tmp_path)
    summary = generate_dataset(root, participants=1, scale=0.06, seed=2, devices=("topcon_triton",))
    expected = write_bad_inputs(root, summary["manifest"])
    assert inspect.main([os.path.join(root, "retinal_oct")]) == 1
    reports = _lines(capsys)
    errors = {r["error"] for r in reports if "error" in r}
    file_reasons = set(expected.values()) - {"missing_file", "malformed_row"}
    assert errors == file_reasons
    assert sum("error" not in r for r in reports) == summary["volumes"]
    assert all(r["path"] in r["message"] for r in reports if "error" in r)
    assert inspect.main([os.path.join(root, "nothing-here.dcm")]) == 1
    assert _lines(capsys)[0]["error"] == "missing_file"


def test_header_only_skips_the_decode(tmp_path, capsys):
    from pydicom.encaps import encapsulate

    ds = oct_dataset(
        volume=np.zeros((4, 32, 32), np.uint8),
        spacing_mm=(0.1, 0.01, 0.05),
        device=DEVICES["topcon_maestro2"],
        participant_id="1",
        laterality="R",
        sop_instance_uid="1.2",
        reference_uid="1.3",
        rng=np.random.default_rng(0),
        transfer_syntax="1.2.840.10008.1.2.4.90",
    )
    ds.PixelData = encapsulate([b"garbage"] * 4)
    path = str(tmp_path / "x.dcm")
    with open(path, "wb") as f:
        f.write(dataset_bytes(ds))
    assert inspect.main(["--header-only", path]) == 0
    assert _lines(capsys)[0]["shape"] == [4, 32, 32]
    assert inspect.main([path]) == 1
    assert _lines(capsys)[0]["error"] == "corrupt_codestream"


def test_gs_urls(dataset, gcs, capsys):
    root, summary = dataset
    local = root + summary["files"][0]
    url = storage.join(gcs, "retinal_oct", "a.dcm")
    with open(local, "rb") as src, storage.open_url(url, "wb") as dst:
        dst.write(src.read())
    assert inspect.main([url]) == 0
    report = _lines(capsys)[0]
    assert report["path"] == url and report["model"] == "Cirrus HD-OCT 5000"
    assert inspect.main([storage.join(gcs, "retinal_oct")]) == 0  # a gs:// folder
    assert [r["path"] for r in _lines(capsys)] == [url]
