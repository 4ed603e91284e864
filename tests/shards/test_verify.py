"""``octjepa verify``: a clean set passes; a flipped byte, a missing shard and a wrong count are each caught."""

from __future__ import annotations

import json
import tarfile

import pytest

import octjepa_cli
import shards
from shards import verify
from shards.synthetic import make_shard_set
from tests.shards.helpers import rewritten


@pytest.fixture
def shard_set(tmp_path):
    root = tmp_path / "set"
    index, samples = make_shard_set(str(root), per_device=4, devices=("topcon_triton", "zeiss_cirrus"))
    return root, index, samples


def _first_shard(root, index):
    entry = index["splits"]["train"]["shards"][0]
    return root / entry["path"], entry


def test_clean_set_passes_with_per_split_per_device_counts(shard_set, capsys):
    root, index, samples = shard_set
    report = verify.verify_shard_set(str(root))
    assert report.ok, report.problems
    assert report.samples_checked == len(samples)
    assert report.shards_checked == sum(len(s["shards"]) for s in index["splits"].values())
    table = {(r.split, r.device): (r.expected, r.found) for r in report.rows}
    expected = {(s, d): (n, n) for s, devices in index["counts"]["by_split_device"].items() for d, n in devices.items()}
    assert table == expected
    assert verify.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "topcon_triton" in out and "MISMATCH" not in out


def test_flipped_byte_is_caught(shard_set, capsys):
    root, index, _ = shard_set
    path, _ = _first_shard(root, index)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a volume: the tar still parses, only the hash can tell
    path.write_bytes(bytes(data))
    report = verify.verify_shard_set(str(root))
    assert not report.ok
    assert any(str(path) in p and "sha256" in p for p in report.problems), report.problems
    assert verify.main([str(root)]) == 1
    assert "PROBLEM" in capsys.readouterr().out


def test_each_sample_that_fails_its_checksum_is_reported_by_key(shard_set, capsys):
    root, index, samples = shard_set
    path, _ = _first_shard(root, index)
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    data = bytearray(path.read_bytes())
    voxel_key, meta_key = sorted({name.split(".")[0] for name in members})[:2]
    volume = members[f"{voxel_key}.npy"]
    data[volume.offset_data + volume.size - 1] ^= 0x01  # a voxel: the tar and the .npy header still parse
    meta = members[f"{meta_key}.json"]
    text = bytes(data[meta.offset_data : meta.offset_data + meta.size])
    changed = text.replace(b'"intensity_mean":127.5', b'"intensity_mean":128.5')  # a digit: still valid JSON
    assert changed != text and json.loads(changed)["intensity_mean"] == 128.5
    data[meta.offset_data : meta.offset_data + meta.size] = changed
    path.write_bytes(bytes(data))
    report = verify.verify_shard_set(str(root))
    per_sample = [p for p in report.problems if "CRC32C" in p]
    assert len(per_sample) == 2, report.problems
    assert any(str(path) in p and voxel_key in p and "'npy'" in p for p in per_sample)
    assert any(str(path) in p and meta_key in p and "'json'" in p for p in per_sample)
    assert verify.main([str(root)]) == 1
    assert f"{voxel_key}: member 'npy' fails its CRC32C check" in capsys.readouterr().out


def test_truncated_shard_is_caught(shard_set):
    root, index, _ = shard_set
    path, _ = _first_shard(root, index)
    path.write_bytes(path.read_bytes()[:700])
    report = verify.verify_shard_set(str(root))
    assert not report.ok
    assert all(str(path) in p for p in report.problems) and report.problems
    assert any(r.found < r.expected for r in report.rows)


def test_missing_shard_is_caught(shard_set):
    root, index, _ = shard_set
    path, entry = _first_shard(root, index)
    path.unlink()
    report = verify.verify_shard_set(str(root))
    assert any(str(path) in p and "missing" in p for p in report.problems), report.problems
    mismatched = [r for r in report.rows if not r.ok]
    assert mismatched and all(r.split == "train" for r in mismatched)
    assert sum(r.expected - r.found for r in report.rows) == entry["num_samples"]


def test_wrong_count_in_the_index_is_caught(shard_set):
    root, index, _ = shard_set
    # Consistent enough for validate_index (split total = sum of its shards), but wrong about the shard's content.
    index["splits"]["train"]["shards"][0]["num_samples"] += 1
    index["splits"]["train"]["num_samples"] += 1
    (root / shards.INDEX_NAME).write_bytes(shards.encode_index(index))
    report = verify.verify_shard_set(str(root))
    assert not report.ok
    path, entry = _first_shard(root, index)
    assert any(str(path) in p and f"the index says {entry['num_samples']}" in p for p in report.problems)


def test_wrong_device_count_in_the_index_is_caught(shard_set):
    root, index, _ = shard_set
    counts = index["counts"]["by_split_device"]["train"]
    counts["topcon_triton"], counts["zeiss_cirrus"] = counts["topcon_triton"] + 1, counts["zeiss_cirrus"] - 1
    (root / shards.INDEX_NAME).write_bytes(shards.encode_index(index))
    report = verify.verify_shard_set(str(root))
    bad = sorted((r.device, r.expected - r.found) for r in report.rows if not r.ok)
    assert bad == [("topcon_triton", 1), ("zeiss_cirrus", -1)]


def test_a_sample_of_the_wrong_format_version_is_caught(tmp_path):
    root = tmp_path / "set"
    index, samples = make_shard_set(str(root), per_device=2, devices=("topcon_triton",))
    key, record = sorted(samples.items())[0]
    meta = json.loads(record["json"])
    bad = rewritten(record, json=json.dumps(dict(meta, format_version=shards.FORMAT_VERSION + 1)).encode())
    entry = shards.write_shard_file(str(root), meta["split"], 0, [bad])
    split = index["splits"][meta["split"]]
    split["shards"][0].update({k: entry[k] for k in ("bytes", "sha256", "num_samples")})
    split["num_samples"] = sum(s["num_samples"] for s in split["shards"])
    (root / shards.INDEX_NAME).write_bytes(shards.encode_index(index))
    report = verify.verify_shard_set(str(root))
    assert any(key in p and "format_version" in p for p in report.problems), report.problems


def test_a_directory_without_index_is_refused(tmp_path, capsys):
    with pytest.raises(shards.ContractError, match="no index.json"):
        verify.verify_shard_set(str(tmp_path))
    assert octjepa_cli.main(["verify", str(tmp_path)]) == 1
    assert "no index.json" in capsys.readouterr().err
