import io
import tarfile

import numpy as np
import pytest

import shards
from shards.synthetic import fake_meta, make_shard_set


def test_write_shard_file_streams_the_same_bytes_as_write_shard(tmp_path):
    _, samples = make_shard_set(str(tmp_path / "src"), per_device=3, devices=("topcon_triton",))
    records = [samples[k] for k in sorted(samples)[:3]]
    expected = io.BytesIO()
    shards.write_shard(expected, records)
    entry = shards.write_shard_file(str(tmp_path / "out"), "val", 3, iter(records))
    data = (tmp_path / "out" / entry["path"]).read_bytes()
    assert data == expected.getvalue()
    assert entry["num_samples"] == 3 and entry["bytes"] == len(data)
    assert [p.name for p in (tmp_path / "out" / "val").iterdir()] == ["shard-000003.tar"]  # no temporary left


def test_a_failed_shard_write_leaves_nothing(tmp_path):
    _, samples = make_shard_set(str(tmp_path / "src"), per_device=2, devices=("topcon_triton",))

    def broken():
        yield from (samples[k] for k in sorted(samples))
        raise OSError("staged sample unreadable")

    with pytest.raises(OSError, match="unreadable"):
        shards.write_shard_file(str(tmp_path / "out"), "val", 0, broken())
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_shards_are_readable_by_webdataset(tmp_path):
    import webdataset as wds

    index, samples = make_shard_set(str(tmp_path / "set"), per_device=2, devices=("topcon_triton", "zeiss_cirrus"))
    urls = [str(tmp_path / "set" / s["path"]) for split in index["splits"].values() for s in split["shards"]]
    read = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(read) == sorted(samples)
    for key, sample in samples.items():
        assert read[key]["npy"] == sample["npy"] and read[key]["json"] == sample["json"]


def test_deferred_volume_members_read_straight_into_a_buffer_and_name_a_truncation(tmp_path):
    volume = np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8)
    meta = {**fake_meta("topcon_triton", 1, "L", (4, 6, 8), "train"), "dtype": "uint8"}
    path = tmp_path / "one.tar"
    with open(path, "wb") as f:
        shards.write_shard(f, [shards.encode_sample(volume, meta)])
    with open(path, "rb") as f:
        (sample,) = shards.iter_shard(f, name=str(path), defer=("npy",))
        member = sample["npy"]
        assert isinstance(member, shards.MemberReader) and isinstance(sample["json"], bytes)
        got, offset, check = shards.decode_sample_header(sample, member.read(0, 4096), member.size)
        assert got == meta
        out = np.empty_like(volume)
        member.readinto(out, offset=offset)
        assert np.array_equal(out, volume)
        check.verify(out)
    with tarfile.open(path) as tar:
        start = tar.getmember(f"{meta['key']}.npy").offset_data
    with open(path, "rb", buffering=0) as f:  # unbuffered: no bytes of the member cached before it shrinks
        samples = shards.iter_shard(f, name=str(path), defer=("npy",))
        sample = next(samples)
        with open(path, "r+b") as w:  # the file shrinks under the reader (tarfile itself catches a short file
            w.truncate(start + offset + 100)  # at the next header): only 100 voxels are left
        with pytest.raises(shards.ContractError, match=r"one\.tar.*\.npy.*truncated \(100 of 192 bytes"):
            sample["npy"].readinto(np.empty_like(volume), offset=offset)


def test_a_checksummed_read_returns_the_members_crc_across_chunks(tmp_path):
    volume = np.random.default_rng(0).integers(0, 2**16, size=(5, 300, 400), dtype=np.uint16)  # 1.1 chunks
    meta = {**fake_meta("topcon_triton", 1, "L", volume.shape, "train"), "dtype": "uint16"}
    record = shards.encode_sample(volume, meta)
    path = tmp_path / "one.tar"
    with open(path, "wb") as f:
        shards.write_shard(f, [record])
    with open(path, "rb") as f:
        (sample,) = shards.iter_shard(f, name=str(path), defer=("npy",))
        member = sample["npy"]
        _, offset, check = shards.decode_sample_header(sample, member.read(0, 4096), member.size)
        out = np.empty_like(volume)
        crc = member.readinto(out, offset=offset, crc=check.header_crc)
        assert crc == shards.read_checksums(record)["npy"] and np.array_equal(out, volume)
        check.verify_running(crc)
        assert member.readinto(out, offset=offset) is None  # no checksum asked, none computed
    with pytest.raises(shards.ContractError, match="'npy' fails its CRC32C check"):
        check.verify_running(crc ^ 1)


def test_members_carry_no_per_member_pax_header(tmp_path):
    _, samples = make_shard_set(str(tmp_path / "set"), per_device=2, devices=("topcon_triton",))
    buf = io.BytesIO()
    shards.write_shard(buf, samples.values())
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        members = tar.getmembers()
    assert len(members) == 3 * len(samples) and all(not m.pax_headers for m in members)
    assert (
        buf.getbuffer().nbytes
        <= sum(512 + -(-len(r[e]) // 512) * 512 for r in samples.values() for e in shards.MEMBER_EXTS) + 10240
    )


def test_complete_set_writes_errors_then_drops_an_earlier_runs_shards_then_writes_the_index(tmp_path):
    _, samples = make_shard_set(str(tmp_path / "src"), per_device=2, devices=("topcon_triton",))
    root = tmp_path / "set"
    (root / "train").mkdir(parents=True)
    (root / "train" / "shard-000007.tar").write_bytes(b"an earlier run's")
    (root / "train" / "notes.txt").write_text("not a shard")
    entry = shards.write_shard_file(str(root), "train", 0, [samples[k] for k in sorted(samples)])
    entry["by_device"] = shards.device_counts(["topcon_triton"] * entry["num_samples"])
    index = shards.complete_set(
        str(root),
        [entry],
        errors=b'{"row": 1}\n',
        config={"made_by": "test"},
        errors_by_reason={"missing_file": 1},
        manifest_rows=3,
        selected=3,
        created_by="test",
    )
    assert sorted(p.name for p in (root / "train").iterdir()) == ["notes.txt", "shard-000000.tar"]
    assert (root / shards.ERRORS_NAME).read_bytes() == b'{"row": 1}\n'
    assert shards.read_index(str(root)) == index
    assert index["counts"]["by_split_device"] == {"train": {"topcon_triton": 2}} and index["errors"]["count"] == 1
