"""Manifest and participants parsing: headings, selection, device domain, malformed rows, split assignment."""

from __future__ import annotations

import pytest

from beam_jobs import manifest as mf

HEADING = [
    "participant_id",
    "manufacturer",
    "manufacturers_model_name",
    "anatomic_region",
    "imaging",
    "laterality",
    "sop_instance_uid",
    "filepath",
]


def tsv(rows: list[list[str]], heading: list[str] = HEADING) -> str:
    return "\n".join("\t".join(r) for r in [heading, *rows]) + "\n"


def path(device: str, pid: str, name: str) -> str:
    return f"/retinal_oct/structural_oct/{device}/{pid}/{name}.dcm"


ROWS = [
    ["1001", "Heidelberg", "Spectralis", "Macula", "OCT", "L", "1.2.1", path("heidelberg_spectralis", "1001", "a")],
    ["1001", "Topcon", "Triton", "Optic Disc", "OCT", "R", "1.2.2", path("topcon_triton", "1001", "b")],
    ["1002", "Zeiss", "Cirrus", "Macula", "OCTA", "L", "1.2.3", path("zeiss_cirrus", "1002", "c")],
    ["1003", "Carl Zeiss Meditec", "Cirrus HD-OCT 5000", "Macula", "OCT", "R", "1.2.4", "/elsewhere/1003/d.dcm"],
    ["1004", "Topcon", "Maestro2", "Wide Field", "OCT", "L", "1.2.5", path("topcon_maestro2", "1004", "e")],
]


def test_both_participant_headings_give_the_same_rows():
    by_participant = mf.parse_manifest("m.tsv", text=tsv(ROWS))
    by_person = mf.parse_manifest("m.tsv", text=tsv(ROWS, ["person_id", *HEADING[1:]]))
    assert by_participant == by_person
    total, rows = by_participant
    assert total == 5
    assert [r.sop_instance_uid for r in rows] == ["1.2.1", "1.2.2", "1.2.4", "1.2.5"]  # the OCTA row is not OCT
    assert rows[0].row_number == 1 and rows[0].participant_id == "1001" and rows[0].laterality == "L"


def test_device_from_path_then_manufacturer_and_model():
    _, rows = mf.parse_manifest("m.tsv", text=tsv(ROWS))
    assert [r.device for r in rows] == ["heidelberg_spectralis", "topcon_triton", "zeiss_cirrus", "topcon_maestro2"]
    assert mf.device_domain("/x/y.dcm", "Optovue", "Avanti XR") == "optovue_avanti_xr"
    assert mf.device_domain("/x/y.dcm") is None


def test_selection_by_device_and_region():
    sel = mf.Selection(devices=("topcon_triton", "zeiss_cirrus"))
    assert [r.sop_instance_uid for r in mf.parse_manifest("m", selection=sel, text=tsv(ROWS))[1]] == ["1.2.2", "1.2.4"]
    sel = mf.Selection(anatomic_regions=("optic_disc", "wide-field"))
    assert [r.sop_instance_uid for r in mf.parse_manifest("m", selection=sel, text=tsv(ROWS))[1]] == ["1.2.2", "1.2.5"]


def test_malformed_rows_are_reported_with_their_row_number():
    rows = [
        ROWS[0],
        ["1005", "Topcon", "Triton", "Macula", "OCT", "L", "1.2.9"],  # a missing field
        ["1006", "Topcon", "Triton", "Macula", "OCT", "L", "", path("topcon_triton", "1006", "f")],  # no UID
        ["1007", "", "", "Macula", "OCT", "L", "1.2.10", "/no/device/here.dcm"],  # no device at all
        ["1008", "Topcon", "Triton", "Macula", "", "L", "1.2.11", path("topcon_triton", "1008", "g")],  # no imaging
        [*ROWS[0][:6], "1.2.1", path("heidelberg_spectralis", "1001", "dup")],  # same image listed twice
    ]
    total, out = mf.parse_manifest("m.tsv", text=tsv(rows))
    assert total == 6
    bad = [r for r in out if isinstance(r, mf.BadRow)]
    assert [b.row_number for b in bad] == [2, 3, 4, 5, 6]
    assert "expected 8 tab-separated fields, found 7" in bad[0].message
    assert "sop_instance_uid" in bad[1].message
    assert "no device" in bad[2].message
    assert "'imaging'" in bad[3].message
    assert "already listed at row 1" in bad[4].message
    record = mf.bad_row_record(bad[0])
    assert record["reason"] == "malformed_row" and record["row"] == 2 and record["stage"] == "manifest"


def test_a_malformed_row_of_an_unselected_device_is_not_selected():
    rows = [["1006", "Topcon", "Triton", "Macula", "OCT", "L", "", path("topcon_triton", "1006", "f")]]
    _, out = mf.parse_manifest("m", selection=mf.Selection(devices=("zeiss_cirrus",)), text=tsv(rows))
    assert out == []


def test_missing_columns_name_the_file_and_column():
    with pytest.raises(mf.ManifestError, match=r"m.tsv: missing column\(s\) \['filepath'\]"):
        mf.parse_manifest("m.tsv", text=tsv([], HEADING[:-1]))
    with pytest.raises(mf.ManifestError, match="no participant column"):
        mf.parse_manifest("m.tsv", text=tsv([], HEADING[1:]))


def test_recommended_split_wins_and_hash_split_is_deterministic():
    participants = "person_id\trecommended_split\n1001\ttest\n1004\tval\n"
    recommended = mf.read_participants("p.tsv", text=participants)
    assert recommended == {"1001": "test", "1004": "val"}
    _, rows = mf.parse_manifest("m", recommended=recommended, text=tsv(ROWS))
    splits = {r.participant_id: r.split for r in rows}
    assert splits["1001"] == "test" and splits["1004"] == "val"
    assert splits["1003"] == mf.hash_split("1003")
    # Every row of a participant lands in one split.
    assert {r.split for r in rows if r.participant_id == "1001"} == {"test"}


def test_hash_split_fraction_and_stability():
    ids = [f"{1000 + i}" for i in range(4000)]
    first = [mf.hash_split(i, 0.1) for i in ids]
    assert first == [mf.hash_split(i, 0.1) for i in ids]
    assert set(first) == {"train", "val"}
    assert 0.08 < first.count("val") / len(ids) < 0.12
    assert all(mf.hash_split(i, 0.0) == "train" for i in ids[:200])


def test_participants_file_errors_name_the_row():
    with pytest.raises(mf.ManifestError, match=r"p.tsv: row 2: .*recommended_split='holdout'"):
        mf.read_participants("p.tsv", text="participant_id\trecommended_split\n1\ttrain\n2\tholdout\n")
    with pytest.raises(mf.ManifestError, match="listed in two splits"):
        mf.read_participants("p.tsv", text="participant_id\trecommended_split\n1\ttrain\n1\tval\n")
    with pytest.raises(mf.ManifestError, match="no 'recommended_split' column"):
        mf.read_participants("p.tsv", text="participant_id\tage\n1\t50\n")


def test_a_second_row_naming_the_same_file_is_a_duplicate_naming_the_row_kept():
    same = path("topcon_triton", "1001", "b")
    triton = ["Topcon", "Triton", "Macula", "OCT", "R"]
    rows = [
        ROWS[1],
        ["2001", *triton, "1.9.1", same.replace("/structural_oct/", "/./structural_oct/")],
        ["2002", *triton, "1.9.2", same.replace("/1001/", "//1001/")],
        ["2003", *triton, "1.9.3", "retinal_oct/structural_oct/x/../topcon_triton/1001/b.dcm"],
        ["2004", *triton, "1.9.4", path("topcon_triton", "1001", "c")],  # another file
    ]
    recommended = {"2001": "val", "2002": "test"}  # other participants, other splits: still the same file
    total, out = mf.parse_manifest("m.tsv", recommended=recommended, text=tsv(rows))
    assert total == 5 and [type(r).__name__ for r in out] == ["Row", "BadRow", "BadRow", "BadRow", "Row"]
    for bad in out[1:4]:
        record = mf.bad_row_record(bad)
        assert record["reason"] == "duplicate_file" and record["stage"] == "manifest" and record["key"]
        assert "is the file of row 1 (/retinal_oct/structural_oct/topcon_triton/1001/b.dcm)" in record["message"]
    assert out[0].path == "retinal_oct/structural_oct/topcon_triton/1001/b.dcm" == mf.normalise_path(rows[3][7])


def test_an_unreadable_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(mf.ManifestError, match=r"cannot be read \(IsADirectoryError"):
        mf.parse_manifest(str(tmp_path))
